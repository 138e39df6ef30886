"""Translation: `{"source": "...", "target": "...", "source_lang": "en", "target_lang": "de"}`.

The language fields are optional (DEFAULT_SOURCE_LANG / DEFAULT_TARGET_LANG apply); codes are
spelled out in the prompt through LANGUAGES. Metrics: corpus BLEU and chrF from sacrebleu
(0-100, sacrebleu's own scale and default settings; BLEU uses the `zh`/`char` tokenizers for
Chinese/Japanese/Korean targets).
"""

from __future__ import annotations

import re

from slmtune.tasks.common import chat_example, optional_str, require_str, strip_fences, strip_prefix, unquote

NAME = "translation"
FORMAT = "chat"
FIELDS = ("source", "target")
SYSTEM_PROMPT = "You are a professional translator. Reply with the translation only."
INSTRUCTION = "Translate the following text from {source_lang} to {target_lang}.\n\n{source}"
DEFAULT_SOURCE_LANG = "en"
DEFAULT_TARGET_LANG = "de"
LANGUAGES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "cs": "Czech", "ru": "Russian", "uk": "Ukrainian", "tr": "Turkish",
    "ar": "Arabic", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "hi": "Hindi", "sv": "Swedish",
    "da": "Danish", "fi": "Finnish", "no": "Norwegian", "el": "Greek", "ro": "Romanian", "hu": "Hungarian",
}
MAX_NEW_TOKENS = 256
USES_LOSS = False
METRIC = "chrf"
COPIED_FROM = None


def language(code: str) -> str:
    return LANGUAGES.get(code.lower().split("-")[0].split("_")[0], code) if code else code


def check(row: dict) -> list:
    problems: list = []
    require_str(row, "source", problems)
    require_str(row, "target", problems)
    optional_str(row, "source_lang", problems)
    optional_str(row, "target_lang", problems)
    return problems


def context(rows: list[dict]) -> dict:
    return {}


def langs(row: dict) -> tuple[str, str]:
    return (row.get("source_lang") or DEFAULT_SOURCE_LANG, row.get("target_lang") or DEFAULT_TARGET_LANG)


def prompt(row: dict) -> str:
    source_lang, target_lang = langs(row)
    return INSTRUCTION.format(source=row["source"], source_lang=language(source_lang),
                              target_lang=language(target_lang))


def target(row: dict) -> str:
    return row["target"]


def to_example(row: dict) -> dict:
    return chat_example(prompt(row), target(row), SYSTEM_PROMPT)


_LEAD_IN = re.compile(r"^(here is|here's|sure|certainly|of course)\b.*[:.!]\s*$", re.IGNORECASE)


def parse(output_text: str, row: dict) -> str:
    """The translation without lead-ins (`Here is the translation:`), `German:`-style labels,
    wrapping quotes or trailing notes; a one-line source keeps the first line of the answer."""
    lines = [line.strip() for line in strip_fences(output_text).splitlines()]
    while lines and (not lines[0] or _LEAD_IN.match(lines[0])):
        lines.pop(0)
    if not lines:
        return ""
    names = ("translation", "german translation", language(langs(row)[1]), langs(row)[1])
    if "\n" not in row["source"].strip():
        text = strip_prefix(lines[0], tuple(n for n in names if n))
    else:
        paragraphs = "\n".join(lines).split("\n\n")
        text = strip_prefix("\n".join(paragraphs[: row["source"].strip().count("\n\n") + 1]).strip(),
                            tuple(n for n in names if n))
    if not row["source"].strip().startswith(('"', "'")):
        text = unquote(text)
    return text.strip()


def _bleu_tokenizer(rows: list[dict]) -> str:
    target_lang = language(langs(rows[0])[1]) if rows else ""
    return {"Chinese": "zh", "Japanese": "char", "Korean": "char"}.get(target_lang, "13a")


def score(predictions: list, rows: list[dict], losses=None) -> dict:
    import sacrebleu

    hyps = [p or "" for p in predictions]
    refs = [[r["target"] for r in rows]]
    return {
        "bleu": sacrebleu.corpus_bleu(hyps, refs, tokenize=_bleu_tokenizer(rows)).score,
        "chrf": sacrebleu.corpus_chrf(hyps, refs).score,
        "n": len(rows),
    }
