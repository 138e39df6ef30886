"""Tasks: turn benchmark-style rows into training examples, parse model outputs, score them.

    from slmtune.tasks import TASKS
    task = TASKS["ner"]
    ctx = task.context(train_rows)             # dataset-level settings, e.g. the label/entity-type set
    example = task.to_example(row, **ctx)      # {"messages": [system, user, assistant]} ({"text"} for domain)
    prediction = task.parse(output_text, row, **ctx)
    metrics = task.score(predictions, rows)    # losses=[{"loss_sum", "n_tokens"}] for domain / chat

Every task module has the same parts, meant to be read and edited:
    NAME, FORMAT ("chat" or "text": what to_example produces), FIELDS (required row fields)
    SYSTEM_PROMPT, INSTRUCTION            the prompt templates (str.format with the row's fields)
    MAX_NEW_TOKENS                        generation budget in `slmtune eval` (0: nothing is generated)
    USES_LOSS                             `slmtune eval` also measures the target-only loss
    METRIC                                the headline metric: benchmarks' tables, train.select_by: metric
                                          (higher is better; domain's perplexity, lower, is not selectable)
    COPIED_FROM                           the row field answers are copied from (qa: "context"), or None:
                                          the tokens of rows that have it are not counted by "auto" epochs'
                                          token term (slmtune/auto.py): copying a span needs no memorizing
    check(row) -> [(code, message[, "warning"])]   used by `slmtune data validate --task`
    context(rows) -> dict, to_example(row, **context), parse(output_text, row, **context), score(...)

Row formats (one JSON object per line):
    classification  {"text", "label"}                       accuracy, macro-F1
    ner             {"tokens", "tags"} (IOB2)                entity-level precision / recall / F1
    translation     {"source", "target", "source_lang"?, "target_lang"?}   BLEU, chrF (sacrebleu)
    qa              {"question", "answers", "context"?}      exact match, token F1 (SQuAD)
    creative        {"prompt", "completion"}                 line count, rhyme scheme adherence
    domain          {"text"}                                 loss, perplexity
    chat            {"messages": [...]}                      loss, perplexity, ROUGE-L
    tools           {"tools": [...], "messages": [...]}      call exact match, name accuracy, JSON validity
"""

from __future__ import annotations

from types import ModuleType

from slmtune.tasks import chat, classification, creative, domain, ner, qa, tools, translation

TASKS: dict[str, ModuleType] = {
    "classification": classification,
    "ner": ner,
    "translation": translation,
    "qa": qa,
    "creative": creative,
    "domain": domain,
    "chat": chat,
    "tools": tools,
}
TASK_NAMES = tuple(TASKS)


def detect_task(row) -> str | None:
    """The task whose fields a row has, where that is unambiguous (prompt/completion is not)."""
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if "messages" in keys and ("tools" in keys or "functions" in keys):
        return "tools"
    if "messages" in keys:
        return "chat"
    if {"tokens", "tags"} <= keys:
        return "ner"
    if {"source", "target"} <= keys:
        return "translation"
    if {"question", "answers"} <= keys:
        return "qa"
    if {"text", "label"} <= keys:
        return "classification"
    if keys == {"text"}:
        return "domain"
    return None
