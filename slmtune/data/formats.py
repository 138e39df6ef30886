"""Training data formats, read from JSON Lines with the line number of every record kept.

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}`
  (OpenAI's fine-tuning format; `weight: 0` on an assistant turn excludes it from the loss)
- prompt_completion: `{"prompt": "...", "completion": "..."}`
- text: `{"text": "..."}` (continued pretraining: loss on every token)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

FORMATS = ("chat", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Unusable training data; the message names the file and line."""


@dataclass
class Record:
    line: int
    data: Any


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, str | None, Any]]:
    """Yield (line number, error or None, parsed value) for every non-blank line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    for number, line in enumerate(raw.split(b"\n"), start=1):
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


def detect_format(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if "messages" in data:
        return "chat"
    if "prompt" in data or "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    return None


def _nonblank_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def check_example(fmt: str, data: dict) -> list[tuple[str, str]]:
    """Problems with one example of a known format, as (code, message) pairs."""
    problems = []
    if fmt == "chat":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return [("missing_messages", "`messages` must be a non-empty list")]
        has_assistant = False
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                problems.append(("invalid_message", f"messages[{i}] is not an object"))
                continue
            role = msg.get("role")
            if role not in ROLES:
                problems.append(("unknown_role", f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}"))
            if not _nonblank_str(msg.get("content")):
                problems.append(("empty_content", f"messages[{i}].content is missing or empty"))
            if "weight" in msg:
                if role != "assistant":
                    problems.append(("bad_weight", f"messages[{i}].weight is only allowed on assistant messages"))
                elif msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool):
                    problems.append(("bad_weight", f"messages[{i}].weight is {msg['weight']!r}; expected 0 or 1"))
            has_assistant |= role == "assistant"
        if not has_assistant:
            problems.append(("no_assistant_message", "the example has no assistant message to learn from"))
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not _nonblank_str(data.get(key)):
                problems.append(("missing_field", f"`{key}` is missing, not a string, or empty"))
    elif fmt == "text":
        if not _nonblank_str(data.get("text")):
            problems.append(("missing_field", "`text` is missing, not a string, or empty"))
    return problems
