"""Small slices of the shared evaluation datasets (../shared/data from the repo root)."""

from __future__ import annotations

import json
from itertools import islice

import pytest

from tests.conftest import SHARED_DATA


def shared_rows(task: str, split: str, n: int | None = None) -> list[dict]:
    path = SHARED_DATA / task / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"shared dataset {path} is not here")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, n)]


def round_trip(module, rows: list[dict]) -> list:
    """Parse every row's gold target text back, with the dataset context training would use."""
    context = module.context(rows)
    out = []
    for row in rows:
        example = module.to_example(row, **context)
        assert example["messages"][-1]["role"] == "assistant"
        out.append(module.parse(example["messages"][-1]["content"], row, **context))
    return out
