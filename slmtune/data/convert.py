"""Bring data from other tools into our JSONL formats.

    slmtune data convert --from alpaca alpaca_data.json train.jsonl
    slmtune data convert --from sharegpt sharegpt.jsonl train.jsonl
    slmtune data convert --from csv spam.csv train.jsonl --task classification --map text=message --map label=category
    slmtune data convert --from csv pairs.csv train.jsonl --map prompt=question --map completion=answer
    slmtune data convert --from hf-datasets saved_dataset/ train.jsonl --split train [--task ner --map tags=ner_tags]

- alpaca: `{"instruction", "input"?, "output", "system"?}` rows (JSON Lines or one JSON array) -> chat;
  the input, when not blank, follows the instruction after a blank line.
- sharegpt: `{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}` -> chat.
- csv: a header row, then one example per row. With --task the columns become that task's fields
  (see TASK_FIELDS; list-valued fields such as ner tokens/tags and qa answers are read as a JSON
  list when the cell starts with `[`, else split on whitespace / taken as one answer); without it,
  prompt/completion. `--map FIELD=COLUMN` names the column for a field (default: the field's name).
- hf-datasets: a folder written by `datasets`' save_to_disk (a Dataset, or a DatasetDict with
  --split, default train); class-label ids are written as their names. Without --task and --map
  every column is written as is.

Every output row is checked the way `slmtune data validate` would; problems are reported all
together with the input's file:line (hf-datasets: `row N`), and nothing is written then.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from slmtune.data.formats import DataError, check_example
from slmtune.tasks import TASKS

SOURCES = ("alpaca", "sharegpt", "csv", "hf-datasets")

# task -> (required fields, optional fields) read from CSV / datasets columns
TASK_FIELDS: dict[str | None, tuple[tuple[str, ...], tuple[str, ...]]] = {
    None: (("prompt", "completion"), ()),
    "classification": (("text", "label"), ()),
    "ner": (("tokens", "tags"), ()),
    "translation": (("source", "target"), ("source_lang", "target_lang")),
    "qa": (("question", "answers"), ("context",)),
    "creative": (("prompt", "completion"), ("lines", "rhyme_scheme")),
    "domain": (("text",), ()),
    "chat": (("user", "assistant"), ("system",)),  # one exchange per row
}
LIST_FIELDS = {("ner", "tokens"), ("ner", "tags"), ("qa", "answers")}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
MAX_SHOWN = 20


@dataclass
class ConvertResult:
    path: Path
    n_rows: int
    format: str


class _Problems:
    def __init__(self, source: str):
        self.source = source
        self.items: list[str] = []

    def add(self, where, code: str, message: str) -> None:
        loc = f"{self.source}:{where}" if isinstance(where, int) else f"{self.source} {where}"
        self.items.append(f"{loc}: error {code}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            shown = "\n".join(self.items[:MAX_SHOWN])
            more = f"\n... and {len(self.items) - MAX_SHOWN} more" if len(self.items) > MAX_SHOWN else ""
            raise DataError(f"{self.source}: {len(self.items)} problem(s); nothing was written\n{shown}{more}")


def iter_json_items(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, value) for every row of a JSON Lines file or of a top-level JSON array (the line
    where each array element starts)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    stripped = text.lstrip()
    if not stripped.startswith("["):
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{number}: invalid_json: line is not valid JSON") from None
        return
    decoder = json.JSONDecoder()
    at = len(text) - len(stripped) + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text):
            raise DataError(f"{path}: the JSON array is not closed")
        if text[at] == "]":
            return
        line = text.count("\n", 0, at) + 1
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{text.count(chr(10), 0, err.pos) + 1}: invalid_json: {err.msg}") from None
        yield line, value


def _nonblank(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def from_alpaca(row: Any, where, problems: _Problems) -> dict | None:
    if not isinstance(row, dict):
        problems.add(where, "not_an_object", "expected a JSON object")
        return None
    ok = True
    for field in ("instruction", "output"):
        if not _nonblank(row.get(field)):
            problems.add(where, "missing_field", f"`{field}` is missing, not a string, or empty")
            ok = False
    for field in ("input", "system"):
        if row.get(field) is not None and not isinstance(row[field], str):
            problems.add(where, "invalid_field", f"`{field}` must be a string")
            ok = False
    if not ok:
        return None
    user = row["instruction"].strip()
    if (row.get("input") or "").strip():
        user += "\n\n" + row["input"].strip()
    messages = [{"role": "system", "content": row["system"]}] if _nonblank(row.get("system")) else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def from_sharegpt(row: Any, where, problems: _Problems) -> dict | None:
    if not isinstance(row, dict):
        problems.add(where, "not_an_object", "expected a JSON object")
        return None
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        problems.add(where, "missing_field", "`conversations` is missing, not a list, or empty")
        return None
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.add(where, "invalid_message", f"conversations[{i}] is not an object")
            return None
        speaker = str(turn.get("from", "")).strip().lower()
        if speaker not in SHAREGPT_ROLES:
            problems.add(where, "unknown_role", f"conversations[{i}].from is {turn.get('from')!r}; expected "
                         "human, gpt or system")
            return None
        if not _nonblank(turn.get("value")):
            problems.add(where, "empty_content", f"conversations[{i}].value is missing or empty")
            return None
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return {"messages": messages}


def _cell(task: str | None, field: str, value: Any) -> Any:
    """A CSV cell (string) or a datasets value as the task field expects it."""
    if (task, field) in LIST_FIELDS:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return value
            return [text] if field == "answers" else text.split()
        if isinstance(value, tuple):
            return list(value)
        return value
    if field == "lines" and isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if field == "label" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value if isinstance(value, int) else str(value)
    return value


def _task_row(task: str | None, record: dict, mapping: dict[str, str]) -> dict:
    required, optional = TASK_FIELDS[task]
    row = {}
    for field in required + optional:
        column = mapping.get(field, field)
        if column not in record:
            continue
        value = record[column]
        if field in optional and (value is None or (isinstance(value, str) and not value.strip())):
            continue
        row[field] = _cell(task, field, value)
    if task == "chat":
        messages = ([{"role": "system", "content": row["system"]}] if _nonblank(row.get("system")) else []) + [
            {"role": "user", "content": row.get("user")}, {"role": "assistant", "content": row.get("assistant")}]
        return {"messages": messages}
    return row


def _check(task: str | None, row: dict, where, problems: _Problems) -> bool:
    if task is None:
        found = [(c, m) for c, m in check_example("prompt_completion", row)]
    else:
        found = [p[:2] for p in TASKS[task].check(row) if len(p) < 3 or p[2] != "warning"]
    for code, message in found:
        problems.add(where, code, message)
    return not found


def _check_columns(columns: list[str], task: str | None, mapping: dict[str, str], source: str) -> None:
    if task not in TASK_FIELDS:
        raise DataError(f"--task {task}: its rows are conversations (OpenAI's chat format with tools), not "
                        "columns; write them as JSON Lines (docs/tools.md)")
    required, optional = TASK_FIELDS[task]
    unknown = sorted(set(mapping) - set(required) - set(optional))
    if unknown:
        raise DataError(f"--map {unknown[0]}=...: {unknown[0]} is not a field of "
                        f"{task or 'prompt/completion'} data (fields: {', '.join(required + optional)})")
    missing = [f"{mapping.get(f, f)!r} (for {f})" if mapping.get(f, f) != f else repr(f)
               for f in required if mapping.get(f, f) not in columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; the columns are {', '.join(columns)}. "
                        "Name the column for a field with --map FIELD=COLUMN")


def read_csv(path: Path, task: str | None, mapping: dict[str, str], problems: _Problems) -> list[dict]:
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    rows = []
    with handle:
        reader = csv.DictReader(handle)
        try:
            columns = reader.fieldnames or []
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"{path}:1: cannot read the header: {err}") from None
        if not columns:
            raise DataError(f"{path}: empty file; a CSV needs a header row")
        _check_columns(columns, task, mapping, f"{path}:1")
        line = reader.line_num + 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as err:
                raise DataError(f"{path}:{line}: not valid CSV: {err}") from None
            where, line = line, reader.line_num + 1
            if not any((v or "").strip() for v in record.values() if isinstance(v, str)):
                continue
            if None in record:
                problems.add(where, "invalid_csv", f"{len(columns) + len(record[None])} cells but {len(columns)} columns")
                continue
            row = _task_row(task, record, mapping)
            if _check(task, row, where, problems):
                rows.append(row)
    return rows


def _label_decoders(features) -> dict:
    """column -> function turning class-label ids (or lists of them) into names."""
    from datasets import ClassLabel

    decoders = {}
    for name, feature in features.items():
        if isinstance(feature, ClassLabel):
            decoders[name] = lambda v, f=feature: f.int2str(v) if isinstance(v, int) and v >= 0 else v
        inner = getattr(feature, "feature", None)
        if isinstance(inner, ClassLabel):
            decoders[name] = lambda v, f=inner: [f.int2str(x) if isinstance(x, int) and x >= 0 else x for x in v]
    return decoders


def read_hf_datasets(path: Path, split: str | None, task: str | None, mapping: dict[str, str],
                     problems: _Problems) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError("--from hf-datasets needs the `datasets` package: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("train" if "train" in loaded else (names[0] if len(names) == 1 else None))
        if chosen not in loaded:
            raise DataError(f"{path}: choose a split with --split ({', '.join(names)})")
        loaded = loaded[chosen]
    elif split:
        raise DataError(f"{path}: holds a single Dataset; --split does not apply")
    decoders = _label_decoders(loaded.features)
    columns = list(loaded.column_names)
    raw = task is None and not mapping
    if not raw:
        _check_columns(columns, task, mapping, str(path))
    rows = []
    for index, record in enumerate(loaded):
        record = {k: decoders[k](v) if k in decoders else v for k, v in record.items()}
        if raw:
            rows.append(record)
            continue
        row = _task_row(task, record, mapping)
        if _check(task, row, f"row {index}", problems):
            rows.append(row)
    return rows


def convert(source: str, src: str | os.PathLike, dest: str | os.PathLike, *, task: str | None = None,
            mapping: dict[str, str] | None = None, split: str | None = None) -> ConvertResult:
    """Convert `src` (alpaca, sharegpt, csv or hf-datasets) into JSON Lines at `dest`."""
    src, dest = Path(src), Path(dest)
    mapping = dict(mapping or {})
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if task is not None and task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if source in ("alpaca", "sharegpt") and (task not in (None, "chat") or mapping):
        raise DataError(f"--from {source} writes chat data; --task/--map apply to csv and hf-datasets")
    if not src.exists():
        raise DataError(f"{src}: no such file or directory")
    problems = _Problems(str(src))
    if source in ("alpaca", "sharegpt"):
        make = from_alpaca if source == "alpaca" else from_sharegpt
        rows = []
        for line, value in iter_json_items(src):
            row = make(value, line, problems)
            if row is not None and _check("chat", row, line, problems):
                rows.append(row)
        fmt = "chat"
    elif source == "csv":
        rows = read_csv(src, task, mapping, problems)
        fmt = task or "prompt_completion"
    else:
        rows = read_hf_datasets(src, split, task, mapping, problems)
        fmt = task or ("prompt_completion" if mapping else "rows")
    problems.raise_if_any()
    if not rows:
        raise DataError(f"{src}: no rows to convert")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, dest)
    return ConvertResult(dest, len(rows), fmt)
