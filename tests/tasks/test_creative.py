import pytest

from slmtune.tasks import creative as task
from tests.tasks.shared import round_trip, shared_rows

ROW = {"prompt": "Write a 4-line stanza in the style of X. Use the rhyme scheme ABAB.",
       "completion": "The sun goes down at end of day,\nAnd stars come out into the night;\n"
                     "The children run along the way,\nAnd all the windows fill with light."}


def test_requested_format():
    assert task.requested(ROW) == (4, "ABAB")
    assert task.requested({"prompt": "Write an 8-line stanza. Use the rhyme scheme AABBCCDD."}) == (8, "AABBCCDD")
    assert task.requested({"prompt": "Write a fourteen-line poem."}) == (14, None)
    assert task.requested({"prompt": "Rhyme scheme: abab"}) == (4, "ABAB")
    assert task.requested({"prompt": "A poem", "lines": 3, "rhyme_scheme": "aba"}) == (3, "ABA")
    assert task.requested({"prompt": "Write a poem."}) == (None, None)


def test_template():
    system, user, assistant = task.to_example(ROW)["messages"]
    assert system["content"] == task.SYSTEM_PROMPT and user["content"] == ROW["prompt"]
    assert assistant["content"] == ROW["completion"]


def test_gold_target_parses_back_on_shared_data():
    rows = shared_rows("creative", "validation")
    lines = round_trip(task, rows)
    assert lines == [[line.strip() for line in r["completion"].splitlines() if line.strip()] for r in rows]
    assert task.score(lines, rows)["line_count_accuracy"] >= 0.99


def test_parse_drops_chatter_title_and_blank_lines():
    output = "Sure! Here is a stanza:\n\n**Evening**\n\nline one\nline two\n\nline three\n"
    assert task.parse(output, ROW) == ["line one", "line two", "line three"]
    assert task.parse("Sure desolation loves to shroud\nHis form", ROW) == ["Sure desolation loves to shroud", "His form"]


@pytest.mark.parametrize("a,b,expected", [
    ("day", "way", True), ("night", "light", True), ("fear", "here", True), ("desire", "admire", True),
    ("be", "liberty", True), ("love", "move", True), ("drown'd", "bound", True), ("saile", "gale", True),
    ("cat", "dog", False), ("sun", "moon", False), ("nation", "motion", False), ("happy", "money", False),
])
def test_rhymes(a, b, expected):
    assert task.rhymes(a, b) is expected


def test_format_metrics_by_hand():
    rows = [ROW, {"prompt": "Write a 4-line stanza. Use the rhyme scheme AABB.", "completion": "x"},
            {"prompt": "Write something nice.", "completion": "x"}]
    predictions = [task.parse(ROW["completion"], ROW), ["The cat", "Wore a hat", "And a dog"], ["free verse"]]
    metrics = task.score(predictions, rows)
    # row 1: 4 lines, pairs (day, way) (night, light) rhyme; row 2: 3 of 4 lines, (cat, hat) rhymes and
    # the pair (dog, <missing>) fails; row 3 requests no format and is skipped.
    assert metrics == {"format_adherence": 0.5, "line_count_accuracy": 0.5, "rhyme_accuracy": 0.5,
                       "rhyme_pair_accuracy": 0.75, "n": 2}
    assert task.required_pairs("ABABCC") == [(0, 2), (1, 3), (4, 5)]
    assert task.required_pairs("AXA") == [(0, 2)]


def test_check():
    assert task.check(ROW) == []
    assert task.check({"prompt": "p"}) == [("missing_field", "`completion` is missing")]
    assert task.check({"prompt": "Write a poem.", "completion": "x"})[0][0] == "no_format_spec"
