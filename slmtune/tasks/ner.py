"""Named-entity recognition: `{"tokens": [...], "tags": [...]}` with IOB2 tags (`B-person`, `I-person`, `O`).

The model reads the tokens joined by spaces and answers one entity per line, in order of
appearance, as `type: entity text` (or `none`). Parsing finds each listed entity back in the
tokens (ignoring spacing, case only as a fallback) and returns spans `(type, start, end)`,
end exclusive. Metric: entity-level precision, recall and F1 over exact (type, start, end)
matches, the way seqeval/conlleval count them, computed here from IOB2 spans.
"""

from __future__ import annotations

import re

from slmtune.tasks.common import chat_example, f1, ratio, strip_fences

NAME = "ner"
FORMAT = "chat"
FIELDS = ("tokens", "tags")
SYSTEM_PROMPT = ("You extract named entities. List each entity on its own line as `type: entity text`, "
                 "in order of appearance. Reply `none` if there are none.")
INSTRUCTION = "Find the named entities in the text.{types}\n\nText: {text}"
TYPES = " Entity types: {types}."
NONE = "none"
MAX_NEW_TOKENS = 128
USES_LOSS = False
METRIC = "f1"
COPIED_FROM = None
_TAG = re.compile(r"^(O|[BI]-\S.*)$")


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities of an IOB2 sequence as (type, start, end), end exclusive. An `I-x` that does not
    continue an `x` entity starts a new one (conlleval's and seqeval's default reading)."""
    out: list[tuple[str, int, int]] = []
    start, kind = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, name = tag.partition("-") if tag != "O" else ("O", "", "")
        if start is not None and (prefix in ("O", "B") or name != kind):
            out.append((kind, start, i))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, name
    return out


def check(row: dict) -> list:
    problems: list = []
    tokens, tags = row.get("tokens"), row.get("tags")
    for field, value in (("tokens", tokens), ("tags", tags)):
        if field not in row:
            problems.append(("missing_field", f"`{field}` is missing"))
        elif not isinstance(value, list) or not value:
            problems.append(("missing_field", f"`{field}` must be a non-empty list"))
        elif not all(isinstance(x, str) and x.strip() for x in value):
            problems.append(("invalid_field", f"`{field}` must hold non-empty strings"))
    if problems:
        return problems
    if len(tokens) != len(tags):
        return [("length_mismatch", f"{len(tokens)} tokens but {len(tags)} tags")]
    previous = "O"
    for i, tag in enumerate(tags):
        if not _TAG.match(tag):
            problems.append(("invalid_tag", f"tags[{i}] is {tag!r}; expected O, B-type or I-type"))
        elif tag.startswith("I-") and previous[2:] != tag[2:]:
            problems.append(("invalid_iob2", f"tags[{i}] is {tag} after {previous}; read as the start of an entity",
                             "warning"))
        previous = tag
    return problems


def context(rows: list[dict]) -> dict:
    """Dataset-level settings: the sorted entity types, listed in the prompt."""
    return {"types": sorted({kind for r in rows if isinstance(r.get("tags"), list)
                             for kind, _, _ in spans([t for t in r["tags"] if isinstance(t, str)])})}


def prompt(row: dict, types: list[str] | None = None) -> str:
    return INSTRUCTION.format(text=" ".join(row["tokens"]), types=TYPES.format(types=", ".join(types)) if types else "")


def target(row: dict) -> str:
    entities = spans(row["tags"])
    if not entities:
        return NONE
    return "\n".join(f"{kind}: {' '.join(row['tokens'][s:e])}" for kind, s, e in entities)


def to_example(row: dict, types: list[str] | None = None) -> dict:
    return chat_example(prompt(row, types), target(row), SYSTEM_PROMPT)


def _compact(text: str) -> str:
    return "".join(text.split())


def _type_key(text: str) -> str:
    return re.sub(r"[\s_\-]+", "-", text.strip().lower())


def _entity_text(raw: str) -> str:
    text = raw.strip()
    if text.endswith((",", ";")) and not re.search(r"&\w+;$", text):  # keep HTML entities (&quot;)
        text = text[:-1].strip()
    for left, right in (('"', '"'), ("'", "'"), ("`", "`"), ("“", "”"), ("**", "**")):
        if len(text) > 2 and text.startswith(left) and text.endswith(right):
            text = text[len(left): -len(right)].strip()
    return text


def _listed(output_text: str, types: list[str] | None) -> list[tuple[str, str]]:
    """(type, text) pairs in the order the output lists them."""
    pairs = []
    if types:
        alternatives = sorted({r"[-_ ]?".join(re.escape(part) for part in re.split(r"[-_ ]+", t)) for t in types},
                              key=len, reverse=True)
        label = re.compile(r"(?<![\w-])(" + "|".join(alternatives) + r")\**\s*[:=]\s*", re.IGNORECASE)
        by_key = {_type_key(t): t for t in types}
        for line in strip_fences(output_text).splitlines():
            found = list(label.finditer(line))
            for k, match in enumerate(found):
                end = found[k + 1].start() if k + 1 < len(found) else len(line)
                text = _entity_text(line[match.end(): end])
                kind = by_key.get(_type_key(match.group(1)))
                if text and kind:
                    pairs.append((kind, text))
        return pairs
    generic = re.compile(r"^\W*([A-Za-z][\w\- ]{0,40}?)\**\s*:\s*(.+)$")
    for line in strip_fences(output_text).splitlines():
        match = generic.match(line.strip())
        if match and _entity_text(match.group(2)):
            pairs.append((_type_key(match.group(1)), _entity_text(match.group(2))))
    return pairs


def _find(tokens: list[str], text: str, start: int, taken: list[bool], fold: bool) -> tuple[int, int] | None:
    want = _compact(text)
    if fold:
        want = want.lower()
    for i in range(start, len(tokens)):
        built = ""
        for j in range(i, len(tokens)):
            if taken[j]:
                break
            built += _compact(tokens[j]).lower() if fold else _compact(tokens[j])
            if built == want:
                return i, j + 1
            if not want.startswith(built):
                break
    return None


def parse(output_text: str, row: dict, types: list[str] | None = None) -> list[tuple[str, int, int]]:
    """Entity spans (type, start, end) found in the tokens for the `type: text` lines of the output."""
    tokens = row["tokens"]
    taken = [False] * len(tokens)
    found = []
    cursor = 0
    for kind, text in _listed(output_text, types):
        where = None
        for start, fold in ((cursor, False), (0, False), (cursor, True), (0, True)):
            where = _find(tokens, text, start, taken, fold)
            if where:
                break
        if where is None:
            continue
        s, e = where
        taken[s:e] = [True] * (e - s)
        cursor = e
        found.append((kind, s, e))
    return sorted(found, key=lambda x: (x[1], x[2], x[0]))


def score(predictions: list, rows: list[dict], losses=None) -> dict:
    """Micro-averaged entity precision/recall/F1 (exact type and boundaries), plus per-type values."""
    counts: dict[str, list[int]] = {}  # type -> [true positives, predicted, gold]
    for pred, row in zip(predictions, rows):
        gold = {tuple(s) for s in spans(row["tags"])}
        guess = {tuple(s) for s in (pred or [])}
        for kind, _, _ in gold | guess:
            counts.setdefault(kind, [0, 0, 0])
        for s in guess:
            counts[s[0]][1] += 1
            counts[s[0]][0] += s in gold
        for s in gold:
            counts[s[0]][2] += 1
    tp, n_pred, n_gold = (sum(c[i] for c in counts.values()) for i in range(3))
    precision, recall = ratio(tp, n_pred), ratio(tp, n_gold)
    per_type = {}
    for kind, (t, p, g) in sorted(counts.items()):
        pr, rc = ratio(t, p), ratio(t, g)
        per_type[kind] = {"precision": pr, "recall": rc, "f1": f1(pr, rc), "support": g}
    return {"precision": precision, "recall": recall, "f1": f1(precision, recall), "per_type": per_type,
            "n": len(rows)}
