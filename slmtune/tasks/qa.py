"""Question answering: `{"question": "...", "answers": ["...", ...], "context": "..."}` (context optional:
without it the task is closed-book).

The model answers with a short span. Metrics are SQuAD v1.1's: exact match and token F1 after
normalization (lower case, no punctuation, no articles a/an/the, single spaces), the best over
the gold answers, averaged over questions (0-1).
"""

from __future__ import annotations

import re
import string
from collections import Counter

from slmtune.tasks.common import chat_example, first_line, nonblank, optional_str, require_str, strip_prefix, unquote

NAME = "qa"
FORMAT = "chat"
FIELDS = ("question", "answers")
SYSTEM_PROMPT = "Answer with the shortest phrase that answers the question, copied from the context when one is given."
INSTRUCTION = "Context: {context}\n\nQuestion: {question}"
INSTRUCTION_CLOSED_BOOK = "Question: {question}"
MAX_NEW_TOKENS = 32
USES_LOSS = False
METRIC = "f1"
COPIED_FROM = "context"  # rows with a context answer with a span of it: "auto" epochs do not count their tokens


def answers(row: dict) -> list[str]:
    value = row["answers"]
    return [value] if isinstance(value, str) else list(value)


def check(row: dict) -> list:
    problems: list = []
    require_str(row, "question", problems)
    optional_str(row, "context", problems)
    if "answers" not in row:
        problems.append(("missing_field", "`answers` is missing"))
    else:
        value = row["answers"]
        if not (nonblank(value) or (isinstance(value, list) and value and all(nonblank(a) for a in value))):
            problems.append(("missing_field", "`answers` must be a non-empty list of non-empty strings"))
    return problems


def context(rows: list[dict]) -> dict:
    return {}


def prompt(row: dict) -> str:
    if row.get("context"):
        return INSTRUCTION.format(context=row["context"], question=row["question"])
    return INSTRUCTION_CLOSED_BOOK.format(question=row["question"])


def target(row: dict) -> str:
    return answers(row)[0]


def to_example(row: dict) -> dict:
    return chat_example(prompt(row), target(row), SYSTEM_PROMPT)


def parse(output_text: str, row: dict) -> str:
    """The answer: first line of the output without an `Answer:` label, quotes or a final period."""
    text = unquote(strip_prefix(first_line(output_text), ("answer", "short answer", "final answer")))
    return re.sub(r"[.。]\s*$", "", text).strip()


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list, rows: list[dict], losses=None) -> dict:
    em = [max(exact_match(p or "", g) for g in answers(r)) for p, r in zip(predictions, rows)]
    f1 = [max(token_f1(p or "", g) for g in answers(r)) for p, r in zip(predictions, rows)]
    n = len(rows)
    return {"exact_match": sum(em) / n if n else 0.0, "f1": sum(f1) / n if n else 0.0, "n": n}
