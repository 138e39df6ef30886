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


def read_records(path: str | Path, fmt: str = "auto", task: str | None = None) -> tuple[str, list[Record]]:
    """Read a training file after validating it; raises DataError listing every problem with its line.
    With `task`, the records are the task's rows as written (slmtune.data.convert_task_records turns
    them into examples) and the returned format is the one the task's examples have."""
    from slmtune.data.validate import validate_file

    report = validate_file(path, fmt=fmt, min_examples=1, task=task)
    if report.errors:
        shown = "\n".join(str(issue) for issue in report.errors[:20])
        more = f"\n... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        raise DataError(f"{path}: {len(report.errors)} problem(s); run `slmtune data validate {path}`\n{shown}{more}")
    records = [Record(line, data) for line, err, data in iter_jsonl(path) if err is None]
    return report.format, records
