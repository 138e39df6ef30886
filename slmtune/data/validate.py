"""Checks on a training file before any compute is spent, in the spirit of OpenAI's fine-tuning
file validation. Every finding has a stable code and the file:line it came from.

    slmtune data validate train.jsonl [--model smollm2-135m-instruct] [--max-length 1024]

Codes (errors unless marked):
  invalid_encoding      line is not UTF-8
  invalid_json          line is not a JSON value
  not_an_object         line is JSON but not an object
  unknown_format        object has none of messages / prompt+completion / text / a preference pair
  mixed_formats         object's format differs from the file's first example
  missing_messages      `messages` is missing, not a list, or empty
  invalid_message       a message is not an object
  unknown_role          role is not system, user, assistant or tool
  empty_content         content is missing, not a string, or blank (an assistant turn with tool_calls may
                        have none)
  too_many_messages     a chat example, preference prompt or reinforcement prompt of more than 1,024
                        messages (formats.MAX_MESSAGES: tokenizing renders a conversation once per turn)
  Function calling (slmtune/data/tools.py):
  invalid_tools         `tools` is not a list of {"type": "function", "function": {name, parameters}}
                        specs (a bad name, a `parameters` that is not a JSON schema, a repeated name)
  invalid_tool_call     `tool_calls` is not a list of {"id", "type": "function", "function": {...}}
  unknown_function      a tool call names a function that is not in `tools`
  invalid_arguments     a call's `arguments` is not a string holding a JSON object
  arguments_violate_schema  the arguments break the function's `parameters` (required keys, types)
  unknown_tool_call_id  a `tool` message's tool_call_id answers no earlier call
  no_assistant_message  a chat example has no assistant turn to learn from
  bad_weight            `weight` is not 0 or 1, or is set on a non-assistant turn
  missing_field         prompt/completion/text missing, not a string, or empty
  Preference pairs (DPO/ORPO; OpenAI's input/preferred_output/non_preferred_output or prompt/chosen/rejected):
  missing_messages      the prompt (input.messages / prompt) is missing or empty
  no_user_turn          the prompt has no user message
  missing_output        preferred_output/non_preferred_output (chosen/rejected) is missing
  not_one_assistant_message  an output is not exactly one message with role assistant
  empty_output          an output has no content
  identical_outputs     the preferred and non-preferred outputs are the same
  too_few_examples      fewer than 10 examples (pairs) in the file
  too_long (warning)    with a model: example exceeds max_length; says how many tokens are cut
  no_trainable_tokens   with a model: nothing in the example reaches the loss
  unknown_task          --task names no task in slmtune/tasks
  Reinforcement rows (with --grader G.json: prompts the grader scores answers to):
  last_message_not_user the last message is not the user's
  missing_grader_field  a field the grader reads ({{item.field}}) is missing from the row
  invalid_grader        the grader itself cannot run (the message names its field)

With `--task T` (or data.task in a recipe) every row is checked as task data instead, with the
task's `check` (codes in slmtune/tasks/common.py: missing_field naming the field, invalid_field,
length_mismatch, invalid_tag, and the warnings invalid_iob2 and no_format_spec); with a model,
rows are measured after the task's template turned them into training examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slmtune.data.formats import (MAX_LINE_BYTES, DataError, Record, check_example, check_reinforcement, detect_format,
                                  iter_jsonl)
from slmtune.data.tokenize import Pair, encode
from slmtune.tasks import TASKS

MIN_EXAMPLES = 10


@dataclass
class Issue:
    code: str
    path: str
    line: int | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.severity} {self.code}: {self.message}"


MAX_LISTED_ISSUES = 200


@dataclass
class Report:
    path: str
    format: str | None = None
    task: str | None = None
    n_examples: int = 0
    issues: list[Issue] = field(default_factory=list)
    total_tokens: int = 0
    tokens_cut: int = 0
    unlisted_errors: int = 0  # errors beyond MAX_LISTED_ISSUES: counted, not kept (memory stays bounded)
    unlisted_warnings: int = 0

    def add(self, issue: Issue) -> None:
        if len(self.issues) < MAX_LISTED_ISSUES:
            self.issues.append(issue)
        elif issue.severity == "error":
            self.unlisted_errors += 1
        else:
            self.unlisted_warnings += 1

    @property
    def n_errors(self) -> int:
        return len(self.errors) + self.unlisted_errors

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]


def validate_file(
    path: str | Path,
    *,
    fmt: str = "auto",
    min_examples: int = MIN_EXAMPLES,
    tokenizer=None,
    max_length: int | None = None,
    system_prompt: str | None = None,
    task: str | None = None,
    grader_fields: set[str] | None = None,
) -> Report:
    """Validate a JSONL training file; with a tokenizer, also measure lengths and truncation.
    With `task`, rows are that task's data (see slmtune/tasks) and are checked by the task.
    With `grader_fields` (slmtune.graders.item_fields of a grader), rows are reinforcement prompts."""
    path = str(path)
    report = Report(path=path, format=None if fmt == "auto" else fmt, task=task)
    if grader_fields is not None:
        report.format = "reinforcement"
        tokenizer = None  # nothing is trained on the rows' text as such: no lengths to measure
    good: list[tuple[int, dict]] = []
    task_module = None
    if task is not None:
        task_module = TASKS.get(task)
        if task_module is None:
            report.issues.append(Issue("unknown_task", path, None,
                                       f"unknown task {task!r}; expected one of {', '.join(TASKS)}"))
            return report
        report.format = task_module.FORMAT
    keep_rows, n_good = tokenizer is not None, 0
    prompt_only: list[int] = []  # chat rows without an answer, ending with the user's turn
    for line, err, data in iter_jsonl(path):
        if err == "invalid_encoding":
            report.add(Issue(err, path, line, "line is not valid UTF-8"))
            continue
        if err == "invalid_json":
            report.add(Issue(err, path, line, "line is not valid JSON"))
            continue
        if err == "nested_too_deeply":
            report.add(Issue(err, path, line, "line is JSON nested too deeply to read"))
            continue
        if err == "line_too_long":
            report.add(Issue(err, path, line, f"line is longer than {MAX_LINE_BYTES // 2**20} MB"))
            continue
        if not isinstance(data, dict):
            report.add(Issue("not_an_object", path, line, f"expected a JSON object, got {type(data).__name__}"))
            continue
        if grader_fields is not None:
            problems = check_reinforcement(data, grader_fields)
            for code, msg in problems:
                report.add(Issue(code, path, line, msg))
            n_good += not problems
            continue
        if task_module is not None:
            problems = [Issue(p[0], path, line, p[1], *p[2:]) for p in task_module.check(data)]
            for problem in problems:
                report.add(problem)
            if not any(p.severity == "error" for p in problems):
                n_good += 1
                if keep_rows:
                    good.append((line, data))
            continue
        found = detect_format(data)
        if found is None:
            report.add(Issue("unknown_format", path, line,
                                       "expected `messages`, `prompt`+`completion` or `text`"))
            continue
        if report.format is None:
            report.format = found
        elif found != report.format:
            report.add(Issue("mixed_formats", path, line, f"{found} example in a {report.format} file"))
            continue
        problems = check_example(report.format, data)
        if fmt == "auto" and report.format == "chat" and [c for c, _ in problems] == ["no_assistant_message"] \
                and not check_reinforcement(data, set()):
            prompt_only.append(line)  # reinforcement data, if every row is such a prompt
            continue
        for code, msg in problems:
            report.add(Issue(code, path, line, msg))
        if not problems:
            n_good += 1
            if keep_rows:  # only the token pass below needs the rows; validation alone streams
                good.append((line, data))
    if prompt_only and not n_good and report.format == "chat":
        # Every row is a conversation ending with the user's turn: prompts for reinforcement fine-tuning.
        report.format, n_good, keep_rows = "reinforcement", len(prompt_only), False
    else:
        for line in prompt_only:
            report.add(Issue("no_assistant_message", path, line, "the example has no assistant message to learn "
                             "from (only a file of such prompts is reinforcement fine-tuning data)"))
    report.n_examples = n_good
    if report.n_examples < min_examples:
        report.add(Issue("too_few_examples", path, None,
                                   f"{report.n_examples} valid example(s); at least {min_examples} are required"))
    if tokenizer is not None and good:
        if task_module is not None:
            context = task_module.context([data for _, data in good])
            good = [(line, task_module.to_example(data, **context)) for line, data in good]
        for line, data in good:
            example = encode(report.format, data, tokenizer, max_length=None, system_prompt=system_prompt)
            # A preference pair is two sequences, each cut at max_length on its own.
            sequences = [example.chosen, example.rejected] if isinstance(example, Pair) else [example]
            n = sum(len(e) for e in sequences)
            report.total_tokens += n
            cut = sum(max(0, len(e) - max_length) for e in sequences) if max_length else 0
            if cut:
                report.tokens_cut += cut
                report.add(Issue("too_long", path, line,
                                           f"{n} tokens > max_length {max_length}: {cut} tokens would be cut",
                                           severity="warning"))
            if example.n_targets(max_length) == 0:
                report.add(Issue("no_trainable_tokens", path, line,
                                           "no token of this example reaches the loss (weights 0, or cut by max_length)"))
    return report


def read_records(path: str | Path, fmt: str = "auto", task: str | None = None,
                 grader_fields: set[str] | None = None) -> tuple[str, list[Record]]:
    """Read a training file after validating it; raises DataError listing every problem with its line.
    With `task`, the records are the task's rows as written (slmtune.data.convert_task_records turns
    them into examples) and the returned format is the one the task's examples have. With
    `grader_fields`, rows are reinforcement prompts (see validate_file)."""
    report = validate_file(path, fmt=fmt, min_examples=1, task=task, grader_fields=grader_fields)
    if report.n_errors:
        shown = "\n".join(str(issue) for issue in report.errors[:20])
        more = f"\n... and {report.n_errors - 20} more" if report.n_errors > 20 else ""
        hint = f"slmtune data validate {path}" + (f" --task {task}" if task else "") + \
            (" --grader GRADER.json" if grader_fields is not None else "")
        raise DataError(f"{path}: {report.n_errors} problem(s); run `{hint}`\n{shown}{more}")
    records = [Record(line, data) for line, err, data in iter_jsonl(path) if err is None]
    return report.format, records
