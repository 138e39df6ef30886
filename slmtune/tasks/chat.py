"""Chat (OpenAI messages): `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`.

Trained as is (SYSTEM_PROMPT, when set, is added to conversations without a system message).
Evaluation: validation loss (target-only, over every trained assistant turn) and perplexity,
and ROUGE-L F1 between the generated reply and the last assistant turn, given the conversation
before it. ROUGE-L is computed here from the longest common subsequence of word tokens
(lower-cased alphanumeric runs, as rouge-score tokenizes without stemming).
"""

from __future__ import annotations

import re

from slmtune.data.formats import check_example
from slmtune.tasks.common import split_last_assistant
from slmtune.tasks.domain import loss_metrics

NAME = "chat"
FORMAT = "chat"
FIELDS = ("messages",)
SYSTEM_PROMPT: str | None = None
INSTRUCTION = "{content}"  # user turns are used as written
MAX_NEW_TOKENS = 256
USES_LOSS = True
METRIC = "rouge_l"
COPIED_FROM = None


def check(row: dict) -> list:
    return check_example("chat", row)


def context(rows: list[dict]) -> dict:
    return {}


def to_example(row: dict) -> dict:
    messages = [dict(m) for m in row["messages"]]
    for m in messages:
        if m["role"] == "user":
            m["content"] = INSTRUCTION.format(content=m["content"])
    if SYSTEM_PROMPT and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return {"messages": messages}


def parse(output_text: str, row: dict) -> str:
    return output_text.strip()


def reference(row: dict) -> str:
    return split_last_assistant(row["messages"])[1]


def tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: list, b: list) -> int:
    """Longest common subsequence length, bit-parallel (Allison-Dix / Hyyro): O(len(a) * len(b) / 64)."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for y in b:
        match = row & masks.get(y, 0)
        row = ((row + match) | (row - match)) & full
    return len(a) - bin(row).count("1")


def rouge_l(prediction: str, gold: str) -> float:
    pred, ref = tokens(prediction), tokens(gold)
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list, rows: list[dict], losses: list[dict] | None = None) -> dict:
    out: dict = {}
    if losses:
        metrics = loss_metrics(losses)
        out |= {"loss": metrics["loss"], "perplexity": metrics["perplexity"], "target_tokens": metrics["tokens"]}
    if predictions is not None and any(p is not None for p in predictions):
        values = [rouge_l(p or "", reference(r)) for p, r in zip(predictions, rows)]
        out["rouge_l"] = sum(values) / len(values) if values else 0.0
    return out | {"n": len(rows)}
