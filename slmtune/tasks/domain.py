"""Domain adaptation by continued pretraining: `{"text": "..."}`, trained on every token.

Nothing is generated; the metric comes from the model's loss on held-out text: mean token
loss and perplexity = exp(loss). `score` takes one `{"loss_sum", "n_tokens"}` entry per row or
per batch (as predictions or as `losses`) and sums them, so the result is per token.
"""

from __future__ import annotations

import math

from slmtune.tasks.common import require_str

NAME = "domain"
FORMAT = "text"
FIELDS = ("text",)
SYSTEM_PROMPT = None
INSTRUCTION = "{text}"  # the training text as is; edit to add a header or a separator
MAX_NEW_TOKENS = 0  # nothing to generate
USES_LOSS = True
METRIC = "perplexity"  # lower is better; nothing generated, so not for train.select_by: metric
COPIED_FROM = None


def check(row: dict) -> list:
    problems: list = []
    require_str(row, "text", problems)
    return problems


def context(rows: list[dict]) -> dict:
    return {}


def to_example(row: dict) -> dict:
    return {"text": INSTRUCTION.format(text=row["text"])}


def parse(output_text: str, row: dict) -> str:
    return output_text.strip()


def loss_metrics(losses: list[dict]) -> dict:
    total = sum(float(x["loss_sum"]) for x in losses)
    tokens = sum(int(x["n_tokens"]) for x in losses)
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"), "tokens": tokens}


def score(predictions: list, rows: list[dict], losses: list[dict] | None = None) -> dict:
    return loss_metrics(losses if losses is not None else predictions) | {"n": len(rows)}
