import math

import pytest

from slmtune.tasks import translation as task
from tests.tasks.shared import round_trip, shared_rows

ROW = {"source": "The cat sleeps.", "target": "Die Katze schläft.", "source_lang": "en", "target_lang": "de"}


def test_template():
    system, user, assistant = task.to_example(ROW)["messages"]
    assert system["content"] == task.SYSTEM_PROMPT
    assert user["content"] == "Translate the following text from English to German.\n\nThe cat sleeps."
    assert assistant["content"] == "Die Katze schläft."
    user = task.to_example({"source": "x", "target": "y", "target_lang": "fr"})["messages"][1]["content"]
    assert user.startswith("Translate the following text from English to French.")


def test_gold_target_parses_back_on_shared_data():
    rows = shared_rows("translation", "validation")
    assert round_trip(task, rows) == [r["target"] for r in rows]


@pytest.mark.parametrize("output", [
    "Die Katze schläft.", "  Die Katze schläft.\n", "Here is the translation:\n\nDie Katze schläft.",
    "German: Die Katze schläft.", "Translation: Die Katze schläft.", '"Die Katze schläft."',
    "Die Katze schläft.\n\nNote: 'schläft' is the present tense.", "```\nDie Katze schläft.\n```",
])
def test_parse_strips_chatter(output):
    assert task.parse(output, ROW) == "Die Katze schläft."


def test_parse_keeps_german_quotes():
    row = dict(ROW, target="„Game of Thrones“-Star")
    assert task.parse("„Game of Thrones“-Star", row) == "„Game of Thrones“-Star"


def test_bleu_and_chrf_by_hand():
    rows = [{"source": "s", "target": "a b c d e g"}]
    metrics = task.score(["a b c d e f"], rows)
    # n-gram precisions 5/6, 4/5, 3/4, 2/3, same length (no brevity penalty)
    assert metrics["bleu"] == pytest.approx(100 * math.exp(sum(map(math.log, [5 / 6, 4 / 5, 3 / 4, 2 / 3])) / 4))
    # chrF (orders 1-6 that occur, beta 2): order 1 P=R=2/3, order 2 P=R=1/2, order 3 P=R=0
    metrics = task.score(["abc"], [{"source": "s", "target": "abd"}])
    assert metrics["chrf"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 0) / 3)
    perfect = task.score(["Die Katze schläft."], [ROW])
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)


def test_check():
    assert task.check(ROW) == []
    assert task.check({"source": "x"}) == [("missing_field", "`target` is missing")]
    assert task.check({"source": "x", "target": "y", "target_lang": ""})[0][0] == "invalid_field"
