import pytest

from slmtune.tasks import TASKS, classification as task
from tests.tasks.shared import round_trip, shared_rows

LABELS = ["ham", "spam"]


def test_registry_and_template():
    assert TASKS["classification"] is task
    row = {"text": "WIN a {prize} now", "label": "spam"}
    example = task.to_example(row, labels=LABELS)
    system, user, assistant = example["messages"]
    assert system == {"role": "system", "content": task.SYSTEM_PROMPT}
    assert user["content"] == "Classify the text. Answer with exactly one of: ham, spam.\n\nText: WIN a {prize} now"
    assert assistant == {"role": "assistant", "content": "spam"}
    assert "one of" not in task.to_example(row)["messages"][1]["content"]  # no label set known
    assert task.context([{"text": "x", "label": "b"}, {"text": "y", "label": "a"}, {"text": "z", "label": "b"}]) \
        == {"labels": ["a", "b"]}


def test_gold_target_parses_back_on_shared_data():
    rows = shared_rows("classification", "train")
    assert round_trip(task, rows) == [r["label"] for r in rows]


@pytest.mark.parametrize("output,expected", [
    ("spam", "spam"), ("Spam", "spam"), ("SPAM.", "spam"), ("  ham\n", "ham"),
    ("Label: ham", "ham"), ("The label is: SPAM!", "spam"), ("**ham**", "ham"), ('"spam"', "spam"),
    ("I think this message is spam, not ham.", "spam"), ("Answer: ham (a normal message)", "ham"),
    ("spam\nExplanation: it asks you to call a premium number", "spam"),
])
def test_parse_is_robust_to_extra_words_case_and_punctuation(output, expected):
    assert task.parse(output, {"text": "t", "label": "ham"}, labels=LABELS) == expected


def test_parse_prefers_the_earliest_and_longest_label():
    labels = ["spam", "not spam"]
    assert task.parse("This is not spam.", {}, labels=labels) == "not spam"
    assert task.parse("Row labels: spam", {"labels": ["spam", "ham"]}) == "spam"  # row's own choices


def test_parse_without_label_set_cleans_the_first_line():
    assert task.parse("Category: Sports!\nmore", {"text": "t", "label": "sports"}) == "sports"
    assert task.parse("no idea", {"text": "t", "label": "x"}, labels=LABELS) == "no idea"


def test_accuracy_and_macro_f1_by_hand():
    rows = [{"text": "t", "label": label} for label in ["a", "a", "b", "b", "c"]]
    metrics = task.score(["a", "b", "b", "B", "zzz"], rows)
    # a: P 1, R 1/2, F 2/3; b: P 2/3, R 1, F 4/5; c: F 0 -> macro (2/3 + 4/5 + 0) / 3
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 3)
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["c"]["support"] == 1
    assert task.score(["a", "b"], [{"text": "t", "label": "a"}, {"text": "t", "label": "b"}])["macro_f1"] == 1.0


def test_check_names_missing_fields():
    assert task.check({"text": "x", "label": "y"}) == []
    assert task.check({"text": "x", "label": 3}) == []
    codes = task.check({"text": "x"})
    assert codes == [("missing_field", "`label` is missing")]
    assert task.check({"label": "y"})[0][0] == "missing_field" and "`text`" in task.check({"label": "y"})[0][1]
