"""The datasets of a run: read and validate the recipe's files, turn task rows into examples, sample,
hold out validation, tokenize with the model's template.

    data = build_datasets(recipe.data, tokenizer, seed)     # what run(recipe) does
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field

from slmtune import auto
from slmtune.data.formats import DataError, Record
from slmtune.data.tokenize import Example, encode
from slmtune.data.validate import read_records
from slmtune.generation import chat_prompt_ids
from slmtune.tasks import TASKS


@dataclass
class Prompt:
    """A reinforcement fine-tuning row: the prompt's token ids (the model's chat template, ready for the
    answer) and the row itself, which graders read as `{{item.field}}`."""

    ids: list[int]
    item: dict
    line: int

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Datasets:
    format: str
    train: list  # Examples (chat, prompt_completion, text), Pairs (preference) or Prompts (reinforcement)
    validation: list
    train_records: list[Record]
    n_examples: int = 0  # examples (pairs) of the training file used, before any was held out: what "auto" sizes for
    held_out: int = 0  # of them, held out for validation (no validation file; data.validation_split)
    # Tokens those examples train on (their answers', after truncation), which "auto" sizes epochs
    # by too; None for pairs and prompts, whose rule counts pairs and prompts only.
    n_target_tokens: int | None = None
    # Task data: the validation rows as read (before the task's template) and the task's settings
    # (label set...), which train.select_by: metric scores answers against.
    validation_rows: list[dict] = field(default_factory=list)
    task_context: dict = field(default_factory=dict)


def encode_prompts(records: list[Record], tokenizer, max_length: int, system_prompt: str | None,
                   source: str) -> list[Prompt]:
    """Reinforcement rows as prompts; a prompt longer than `max_length` is an error (cutting it would
    leave the model a question it cannot see)."""
    prompts, too_long = [], []
    for record in records:
        messages = record.data["messages"]
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        ids = chat_prompt_ids(tokenizer, messages, record.data.get("tools"))
        if len(ids) > max_length:
            too_long.append(f"{source}:{record.line}: the prompt has {len(ids)} tokens, more than data.max_length "
                            f"{max_length}")
        prompts.append(Prompt(ids, record.data, record.line))
    if too_long:
        more = f"\n... and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        raise DataError("\n".join(too_long[:10]) + more + "\nraise data.max_length or shorten these prompts")
    return prompts


def tokenize_records(fmt: str, records: list[Record], tokenizer, max_length: int, system_prompt: str | None,
                     source: str) -> list:
    if fmt == "reinforcement":
        return encode_prompts(records, tokenizer, max_length, system_prompt, source)
    examples, empty = [], []
    for record in records:
        example = encode(fmt, record.data, tokenizer, max_length, system_prompt)
        if example.n_targets() == 0:
            empty.append(record.line)
        else:
            examples.append(example)
    if empty:
        print(f"warning: {source}: {len(empty)} example(s) have no trainable tokens after truncation to "
              f"{max_length} tokens and are skipped (lines {', '.join(map(str, empty[:10]))}"
              f"{', ...' if len(empty) > 10 else ''})", file=sys.stderr)
    if not examples:
        raise DataError(f"{source}: no example has trainable tokens")
    return examples


class CountTooSlow(DataError):
    """count_target_tokens ran out of its time limit."""


def count_target_tokens(cfg, tokenizer, enough: int | None = None, time_limit: float | None = None) -> int | None:
    """Datasets.n_target_tokens of the `data` section's training file (every row, held-out ones too)
    without building the datasets, stopping as soon as `enough` tokens are counted (auto.tokens_enough:
    beyond it the auto rule no longer looks). None for preference pairs and reinforcement prompts.
    Raises DataError for a file that cannot be read, CountTooSlow (a DataError) when `time_limit`
    seconds have passed at a row boundary (a row itself is not interrupted: about two renders of its
    template per assistant turn, at most formats.MAX_MESSAGES messages); a chat template refusing a
    row raises what the template raises. For files used whole (no
    data.max_examples), as a service job's are."""
    if cfg.max_examples:
        raise ValueError("count_target_tokens counts whole files; data.max_examples samples them")
    deadline = time.monotonic() + time_limit if time_limit is not None else None
    fmt, records = read_records(cfg.train, cfg.format, cfg.task)
    if fmt in ("preference", "reinforcement"):
        return None
    share = learned_share(cfg.task, records)  # task rows whose answers are copied do not count (build_datasets)
    if cfg.task:
        if share == 0:
            return 0
        records = convert_task_records(cfg.task, records, cfg.train, task_context(cfg.task, records))
        enough = math.ceil(enough / share) if enough is not None else None
    total = 0
    for i, record in enumerate(records):
        if deadline is not None and time.monotonic() > deadline:
            raise CountTooSlow(f"{cfg.train}: counting the answers' tokens took more than {time_limit:g} s "
                            f"({i} of {len(records)} rows, {total} tokens, most answers cut by max_length or "
                            "weighted 0?)")
        total += encode(fmt, record.data, tokenizer, cfg.max_length, cfg.system_prompt).n_targets()
        if enough is not None and total >= enough:
            return round(total * share)
    if not total:
        raise DataError(f"{cfg.train}: no example has trainable tokens")
    return round(total * share)


def learned_share(task: str | None, records: list[Record]) -> float:
    """The share of `task`'s rows whose answers the model must learn rather than copy from the row
    (the task's COPIED_FROM field, e.g. extractive QA's context): "auto" epochs count only their
    answer tokens. 1.0 without a task (chat files, as a service job's) or when nothing is copied."""
    field_name = TASKS[task].COPIED_FROM if task else None
    if not field_name or not records:
        return 1.0
    copied = sum(1 for r in records if isinstance(r.data, dict) and r.data.get(field_name))
    return 1.0 - copied / len(records)


def sample_records(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    """A seeded random sample of at most `limit` records, in file order."""
    if not limit or len(records) <= limit:
        return records
    return sorted(random.Random(seed).sample(records, limit), key=lambda r: r.line)


def task_context(task: str, records: list[Record]) -> dict:
    """The task's dataset-level settings (label or entity-type set), from the full training file."""
    return TASKS[task].context([r.data for r in records])


def convert_task_records(task: str, records: list[Record], source: str, context: dict) -> list[Record]:
    """Task rows -> training examples (chat or text) through the task's template, lines kept."""
    module, out = TASKS[task], []
    for record in records:
        try:
            out.append(Record(record.line, module.to_example(record.data, **context)))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise DataError(f"{source}:{record.line}: cannot turn the row into a {task} example: "
                            f"{type(err).__name__}: {err}") from None
    return out


def pairs_from_task_examples(records: list[Record], seed: int, source: str) -> list[Record]:
    """Preference pairs from task examples: the reference answer is preferred over a wrong one, the
    answer of another row (seeded), so DPO/ORPO can train on any task's data (a classification
    label over another label, a QA answer over another question's answer)."""
    answers = [r.data["messages"][-1]["content"] for r in records]
    if len({a.strip() for a in answers}) < 2:
        raise DataError(f"{source}: every row has the same answer; preference pairs need a wrong answer to prefer "
                        "the right one over")
    rng = random.Random(seed)
    out = []
    for record, answer in zip(records, answers):
        wrong = answer
        while wrong.strip() == answer.strip():
            wrong = answers[rng.randrange(len(answers))]
        messages = record.data["messages"]
        out.append(Record(record.line, {"input": {"messages": messages[:-1]},
                                        "preferred_output": [{"role": "assistant", "content": answer}],
                                        "non_preferred_output": [{"role": "assistant", "content": wrong}]}))
    return out


def build_datasets(cfg, tokenizer, seed: int, *, pairs: bool = False, grader_fields: set[str] | None = None) -> Datasets:
    """Read, validate and tokenize the recipe's `data` section (converting task rows first when
    `data.task` is set, and sampling `data.max_examples`). With `pairs` (a preference objective),
    task rows become preference pairs (pairs_from_task_examples); files must hold pairs otherwise.
    With `grader_fields` (a reinforcement objective: the item fields its grader reads), rows are
    prompts that must carry those fields (format "reinforcement")."""
    if grader_fields is not None and cfg.task:
        raise DataError(f"{cfg.train}: data.task converts rows into answered examples; reinforcement fine-tuning "
                        "takes prompt rows as they are (leave data.task unset)")
    fmt, records = read_records(cfg.train, cfg.format, cfg.task, grader_fields)
    context = task_context(cfg.task, records) if cfg.task else {}
    val_records: list[Record] = []
    if cfg.validation:
        val_fmt, val_records = read_records(cfg.validation, cfg.format, cfg.task, grader_fields)
        if val_fmt != fmt:
            raise DataError(f"{cfg.validation}: validation data is {val_fmt} but training data is {fmt}")
    held_out = 0
    if not cfg.validation and cfg.validation_split:
        if cfg.validation_split == "auto":  # sized for the examples that will be trained on
            held_out = auto.held_out(min(len(records), cfg.max_examples or len(records)))
        else:
            held_out = max(1, round(len(records) * cfg.validation_split))
            if held_out >= len(records):
                raise DataError(f"{cfg.train}: too few examples to hold out {cfg.validation_split:.0%} for "
                                "validation")
    if held_out:
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        val_records, records = shuffled[:held_out], sorted(shuffled[held_out:], key=lambda r: r.line)
    if cfg.max_examples:
        records = sample_records(records, cfg.max_examples, seed)
        val_records = sample_records(val_records, cfg.max_examples, seed)
    n_examples = len(records) + (len(val_records) if held_out else 0)
    validation_rows = [r.data for r in val_records] if cfg.task else []
    rows_counted = records + (val_records if held_out else [])  # as read, before the task's template
    if cfg.task:
        records = convert_task_records(cfg.task, records, cfg.train, context)
        val_records = convert_task_records(cfg.task, val_records, cfg.validation or cfg.train, context)
        if pairs and fmt == "chat":
            records = pairs_from_task_examples(records, seed, cfg.train)
            val_records = pairs_from_task_examples(val_records, seed + 1, cfg.validation or cfg.train) \
                if val_records else []
            fmt = "preference"
    train = tokenize_records(fmt, records, tokenizer, cfg.max_length, cfg.system_prompt, cfg.train)
    validation = (tokenize_records(fmt, val_records, tokenizer, cfg.max_length, cfg.system_prompt,
                                   cfg.validation or f"{cfg.train} (validation split)") if val_records else [])
    n_target_tokens = None
    if fmt not in ("preference", "reinforcement"):
        counted = train + (validation if held_out else [])
        n_target_tokens = round(sum(example.n_targets() for example in counted)
                                * learned_share(cfg.task, rows_counted))
    # held_out counts rows (as the service's rule does before tokenizing), not the tokenized examples
    # left after rows without trainable tokens are skipped, so both resolve the same epochs.
    return Datasets(fmt, train, validation, records, n_examples=n_examples, held_out=len(val_records) if held_out else 0,
                    n_target_tokens=n_target_tokens, validation_rows=validation_rows, task_context=context)
