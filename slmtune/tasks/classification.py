"""Text classification: `{"text": "...", "label": "spam"}` (optionally `"labels": [...]`, the choices).

The label set is read from the training file (or from a row's own `labels`) and listed in the
prompt, so the base model knows its choices and the prompt is the same in training and in eval.
Metrics: accuracy and macro-F1 over the gold label set (a prediction outside it counts as wrong).
"""

from __future__ import annotations

import re

from slmtune.tasks.common import chat_example, f1, first_line, nonblank, ratio, strip_prefix, unquote

NAME = "classification"
FORMAT = "chat"
FIELDS = ("text", "label")
SYSTEM_PROMPT = "You are a text classifier. Reply with the label only."
INSTRUCTION = "Classify the text.{choices}\n\nText: {text}"
CHOICES = " Answer with exactly one of: {labels}."
MAX_NEW_TOKENS = 16
USES_LOSS = False
METRIC = "macro_f1"
COPIED_FROM = None
_PREFIXES = ("label", "answer", "class", "category", "classification", "prediction")


def label_of(row: dict) -> str:
    return str(row["label"])


def check(row: dict) -> list:
    problems: list = []
    if not nonblank(row.get("text")):
        problems.append(("missing_field", "`text` is missing, not a string, or empty"))
    label = row.get("label")
    if "label" not in row:
        problems.append(("missing_field", "`label` is missing"))
    elif isinstance(label, bool) or not (isinstance(label, int) or nonblank(label)):
        problems.append(("missing_field", "`label` must be a non-empty string or an integer"))
    if "labels" in row and not (isinstance(row["labels"], list) and row["labels"]
                                and all(isinstance(x, (str, int)) for x in row["labels"])):
        problems.append(("invalid_field", "`labels` must be a non-empty list of labels"))
    return problems


def context(rows: list[dict]) -> dict:
    """Dataset-level settings passed to to_example/parse: the sorted label set."""
    return {"labels": sorted({label_of(r) for r in rows if "label" in r})}


def _choices(row: dict, labels) -> list[str]:
    return [str(x) for x in (row.get("labels") or labels or [])]


def prompt(row: dict, labels: list[str] | None = None) -> str:
    choices = _choices(row, labels)
    return INSTRUCTION.format(text=row["text"], choices=CHOICES.format(labels=", ".join(choices)) if choices else "")


def target(row: dict) -> str:
    return label_of(row)


def to_example(row: dict, labels: list[str] | None = None) -> dict:
    return chat_example(prompt(row, labels), target(row), SYSTEM_PROMPT)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", str(text).lower()).split())


def parse(output_text: str, row: dict, labels: list[str] | None = None) -> str:
    """The label named by the output: the known label that appears first (longest on ties), as a
    whole word, in any case; without a known label set, the cleaned first line."""
    text = unquote(strip_prefix(first_line(output_text), _PREFIXES))
    norm = normalize(text)
    choices = _choices(row, labels)
    if choices:
        exact = [c for c in choices if normalize(c) == norm]
        if exact:
            return exact[0]
        haystack = f" {normalize(output_text)} "
        found = []
        for c in choices:
            at = haystack.find(f" {normalize(c)} ")
            if at >= 0 and normalize(c):
                found.append((at, -len(normalize(c)), c))
        if found:
            return min(found)[2]
    return norm


def score(predictions: list, rows: list[dict], losses=None) -> dict:
    gold = [normalize(label_of(r)) for r in rows]
    pred = [normalize(p) if p is not None else "" for p in predictions]
    classes = sorted(set(gold))
    per_class = {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1(precision, recall), "support": tp + fn}
    return {
        "accuracy": ratio(sum(g == p for g, p in zip(gold, pred)), len(gold)),
        "macro_f1": ratio(sum(v["f1"] for v in per_class.values()), len(per_class)),
        "per_class": per_class,
        "n": len(gold),
    }
