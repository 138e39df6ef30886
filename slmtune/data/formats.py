"""Training data formats, read from JSON Lines with the line number of every record kept.

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}`
  (OpenAI's fine-tuning format; `weight: 0` on an assistant turn excludes it from the loss), with
  function calling: `tools`, assistant `tool_calls`, `tool` messages (slmtune/data/tools.py; the legacy
  `functions`/`function_call` shape is converted)
- prompt_completion: `{"prompt": "...", "completion": "..."}`
- text: `{"text": "..."}` (continued pretraining: loss on every token)
- reinforcement (RFT, with a grader): `{"messages": [... ending with a user turn], <any fields the
  grader's templates read as {{item.field}}>}`; checked by `check_reinforcement`
- preference (DPO/ORPO): OpenAI's `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
  "content": "..."}], "non_preferred_output": [...]}`, or `{"prompt", "chosen", "rejected"}` where each is a
  string or a list of messages (`preference_parts` turns both into one prompt and two assistant messages)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from slmtune.data.tools import check_messages, from_legacy, uses_tools

FORMATS = ("chat", "prompt_completion", "text", "preference")
ROLES = ("system", "user", "assistant")
CHAT_ROLES = ROLES + ("tool",)


class DataError(ValueError):
    """Unusable training data; the message names the file and line."""


@dataclass
class Record:
    line: int
    data: Any


MAX_LINE_BYTES = 32 * 2**20  # one example; longer lines are reported, never held in memory whole
# Messages of one chat example: tokenizing renders the conversation once per turn, so a row's cost
# grows with the square of its messages (1,024: about 2 s; an unbounded row could take hours).
# Preference prompts and reinforcement prompts are rendered once, but hold the same cap: a row's
# problems are listed per message, and no real prompt comes near it.
MAX_MESSAGES = 1024


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, str | None, Any]]:
    """Yield (line number, error or None, parsed value) for every non-blank line, reading one line at a
    time: errors are invalid_encoding, invalid_json, nested_too_deeply, line_too_long."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    with f:
        number = 0
        while True:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the line in bounded reads
                    line = f.readline(MAX_LINE_BYTES)
                yield number, "line_too_long", None
                continue
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield number, "invalid_encoding", None
                continue
            try:
                yield number, None, json.loads(text)
            except json.JSONDecodeError:
                yield number, "invalid_json", None
            except RecursionError:
                yield number, "nested_too_deeply", None


PREFERENCE_KEYS = ({"preferred_output", "non_preferred_output"}, {"chosen", "rejected"})


def detect_format(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if any(keys & set(data) for keys in PREFERENCE_KEYS):
        return "preference"
    if "messages" in data:
        return "chat"
    if "prompt" in data or "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    return None


def too_many_messages(what: str, n: int) -> tuple[str, str]:
    return ("too_many_messages", f"{what} holds {n} messages, more than the {MAX_MESSAGES} an example may have")


def _nonblank_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def check_example(fmt: str, data: dict) -> list[tuple[str, str]]:
    """Problems with one example of a known format, as (code, message) pairs."""
    problems = []
    if fmt == "chat":
        data = from_legacy(data)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return [("missing_messages", "`messages` must be a non-empty list")]
        if len(messages) > MAX_MESSAGES:
            return [too_many_messages("`messages`", len(messages))]
        has_assistant = False
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                problems.append(("invalid_message", f"messages[{i}] is not an object"))
                continue
            role = msg.get("role")
            if role not in CHAT_ROLES:
                problems.append(("unknown_role", f"messages[{i}].role is {role!r}; expected one of "
                                                 f"{', '.join(CHAT_ROLES)}"))
            # An assistant turn that calls tools may have no text.
            if not _nonblank_str(msg.get("content")) and not (role == "assistant" and msg.get("tool_calls")):
                problems.append(("empty_content", f"messages[{i}].content is missing or empty"))
            if "weight" in msg:
                if role != "assistant":
                    problems.append(("bad_weight", f"messages[{i}].weight is only allowed on assistant messages"))
                elif msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool):
                    problems.append(("bad_weight", f"messages[{i}].weight is {msg['weight']!r}; expected 0 or 1"))
            has_assistant |= role == "assistant"
        if not has_assistant:
            problems.append(("no_assistant_message", "the example has no assistant message to learn from"))
        problems.extend(check_messages(data))
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not _nonblank_str(data.get(key)):
                problems.append(("missing_field", f"`{key}` is missing, not a string, or empty"))
    elif fmt == "text":
        if not _nonblank_str(data.get("text")):
            problems.append(("missing_field", "`text` is missing, not a string, or empty"))
    elif fmt == "preference":
        problems.extend(check_preference(data))
    elif fmt == "reinforcement":  # without a grader at hand: the fields it reads are checked with it
        problems.extend(check_reinforcement(data, set()))
    return problems


def _messages(value) -> list | None:
    """A prompt or an output as a message list (a plain string is one message); None if neither."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value if isinstance(value, list) else None


def preference_tools(data: dict) -> list | None:
    """The tools a preference pair's prompt offers (OpenAI's `input.tools`), if any."""
    inp = data.get("input")
    return inp.get("tools") if isinstance(inp, dict) else None


def preference_parts(data: dict) -> tuple[list[dict], dict, dict]:
    """(prompt messages, preferred assistant message, non-preferred assistant message) of a valid
    preference example, in either shape."""
    if "preferred_output" in data:
        return list(data["input"]["messages"]), data["preferred_output"][0], data["non_preferred_output"][0]
    prompt = _messages(data["prompt"])
    outputs = []
    for key in ("chosen", "rejected"):
        value = data[key]
        outputs.append({"role": "assistant", "content": value} if isinstance(value, str) else value[-1])
    return list(prompt), outputs[0], outputs[1]


def check_preference(data: dict) -> list[tuple[str, str]]:
    """Problems of one preference example, as (code, message) pairs."""
    openai_shape = "preferred_output" in data or "non_preferred_output" in data or "input" in data
    if openai_shape:
        inp = data.get("input")
        prompt = inp.get("messages") if isinstance(inp, dict) else None
        if not isinstance(prompt, list) or not prompt:
            return [("missing_messages", "`input.messages` must be a non-empty list of messages")]
        names, outputs = ("preferred_output", "non_preferred_output"), [data.get("preferred_output"),
                                                                        data.get("non_preferred_output")]
    else:
        prompt = _messages(data.get("prompt"))
        if prompt is None or not prompt:
            return [("missing_messages", "`prompt` must be a string or a non-empty list of messages")]
        names, outputs = ("chosen", "rejected"), [data.get("chosen"), data.get("rejected")]
        # A chosen/rejected string is the assistant's answer; a list holds it as its last message.
        outputs = [[{"role": "assistant", "content": o}] if isinstance(o, str) else
                   (o[-1:] if isinstance(o, list) and o else o) for o in outputs]
    if len(prompt) > MAX_MESSAGES:
        return [too_many_messages("the prompt", len(prompt))]
    problems = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict):
            problems.append(("invalid_message", f"prompt message {i} is not an object"))
        elif message.get("role") not in CHAT_ROLES:
            problems.append(("unknown_role", f"prompt message {i} has role {message.get('role')!r}; expected one "
                                             f"of {', '.join(CHAT_ROLES)}"))
        elif not _nonblank_str(message.get("content")) and not message.get("tool_calls"):
            problems.append(("empty_content", f"prompt message {i} has no content"))
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in prompt):
        problems.append(("no_user_turn", "the prompt has no user message to answer"))
    texts = []
    for name, output in zip(names, outputs):
        if output is None:
            problems.append(("missing_output", f"`{name}` is missing"))
        elif not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict) \
                or output[0].get("role") != "assistant":
            problems.append(("not_one_assistant_message",
                             f"`{name}` must be exactly one message with role assistant"))
        elif not _nonblank_str(output[0].get("content")) and not output[0].get("tool_calls"):
            problems.append(("empty_output", f"`{name}` has no content"))
        else:  # an answer is its text and its calls (a preferred call over another call is a pair)
            texts.append(((output[0].get("content") or "").strip(), json.dumps(output[0].get("tool_calls"))))
    if len(texts) == 2 and texts[0] == texts[1]:
        problems.append(("identical_outputs", "the preferred and non-preferred outputs are the same; the pair "
                                              "teaches nothing"))
    tools = preference_tools(data)
    called = [m for m in prompt if isinstance(m, dict)] + [o[0] for o in outputs if isinstance(o, list) and o
                                                          and isinstance(o[0], dict)]
    if tools is not None or uses_tools(called):
        # The prompt and each answer as one conversation: calls are checked against input.tools.
        for name, output in zip(names, outputs):
            answer = output[:1] if isinstance(output, list) else []
            conversation = {"messages": [m for m in prompt if isinstance(m, dict)] + answer}
            if tools is not None:
                conversation["tools"] = tools
            answer_at = f"messages[{len(prompt)}]"
            problems.extend((code, message.replace(answer_at, f"`{name}`"))
                            for code, message in check_messages(conversation))
    return list(dict.fromkeys(problems))  # a prompt's problem is found once per answer: listed once


def check_reinforcement(data: dict, grader_fields: set[str]) -> list[tuple[str, str]]:
    """Problems of one reinforcement fine-tuning row: a prompt for the model to answer (messages
    ending with a user turn, no answer) and every item field the grader reads."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        return [("missing_messages", "`messages` must be a non-empty list")]
    if len(messages) > MAX_MESSAGES:
        return [too_many_messages("`messages`", len(messages))]
    problems = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            problems.append(("invalid_message", f"messages[{i}] is not an object"))
        elif msg.get("role") not in ROLES:
            problems.append(("unknown_role", f"messages[{i}].role is {msg.get('role')!r}; expected one of "
                                             f"{', '.join(ROLES)}"))
        elif not _nonblank_str(msg.get("content")):
            problems.append(("empty_content", f"messages[{i}].content is missing or empty"))
    if isinstance(messages[-1], dict) and messages[-1].get("role") != "user":
        problems.append(("last_message_not_user", "the last message must be the user's: the model writes the "
                                                  "answer the grader scores"))
    for name in sorted(grader_fields - set(data)):
        problems.append(("missing_grader_field", f"`{name}` is missing; the grader reads {{{{item.{name}}}}}"))
    return problems

