"""Helpers shared by the task modules: field checks, answer clean-up, prompt/reference split."""

from __future__ import annotations

import json
import re
from typing import Any

# `check(row)` returns problems as (code, message) or (code, message, "warning"). Codes:
#   missing_field     a required field is missing, not of the expected type, or empty
#   invalid_field     a field is present but its value is unusable (wrong element type, ...)
#   length_mismatch   ner: `tokens` and `tags` differ in length
#   invalid_tag       ner: a tag is not `O`, `B-type` or `I-type`
#   invalid_iob2      ner (warning): `I-type` not preceded by `B-type`/`I-type`; read as an entity start
#   no_format_spec    creative (warning): no line count / rhyme scheme found in the prompt
Problem = tuple


def nonblank(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def require_str(row: dict, field: str, problems: list) -> bool:
    if field not in row:
        problems.append(("missing_field", f"`{field}` is missing"))
        return False
    if not nonblank(row[field]):
        problems.append(("missing_field", f"`{field}` is not a string or is empty"))
        return False
    return True


def optional_str(row: dict, field: str, problems: list) -> None:
    if field in row and row[field] is not None and not nonblank(row[field]):
        problems.append(("invalid_field", f"`{field}` must be a non-empty string when given"))


_FENCE = re.compile(r"^```[\w-]*\s*$")


def strip_fences(text: str) -> str:
    """Drop markdown code fences a chatty model may wrap its answer in."""
    return "\n".join(line for line in text.strip().splitlines() if not _FENCE.match(line.strip())).strip()


def first_line(text: str) -> str:
    for line in strip_fences(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def strip_prefix(text: str, words: tuple[str, ...]) -> str:
    """Remove a leading `Answer:`-style label (`answer is`, `**Answer**:` ...), case-insensitively."""
    pattern = r"^\W*(?:the\s+)?(?:" + "|".join(re.escape(w) for w in words) + r")\b\**\s*(?:is\b|was\b)?\s*[:=\-]?\s*"
    stripped = re.sub(pattern, "", text, flags=re.IGNORECASE)
    return stripped if stripped.strip() else text


def unquote(text: str) -> str:
    text = text.strip()
    for left, right in (('"', '"'), ("'", "'"), ("“", "”"), ("`", "`"), ("**", "**")):
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            inner = text[len(left): -len(right)]
            if left not in inner and right not in inner:
                return inner.strip()
    return text


def split_last_assistant(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to the last assistant turn (the generation prompt) and that turn's text
    (for a turn that only calls tools, its calls' functions as JSON)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            message = messages[i]
            if not message.get("content") and message.get("tool_calls"):
                return list(messages[:i]), json.dumps([c["function"] for c in message["tool_calls"]])
            return list(messages[:i]), message.get("content") or ""
    raise ValueError("the example has no assistant message")


def chat_example(user: str, assistant: str, system: str | None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
