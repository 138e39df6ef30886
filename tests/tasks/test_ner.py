import pytest

from slmtune.tasks import ner as task
from tests.tasks.shared import round_trip, shared_rows

TYPES = ["corporation", "creative-work", "group", "location", "person", "product"]


def test_iob2_spans():
    assert task.spans(["B-person", "I-person", "O", "B-location", "I-location", "I-location"]) == [
        ("person", 0, 2), ("location", 3, 6)]
    assert task.spans(["B-person", "B-person", "I-person"]) == [("person", 0, 1), ("person", 1, 3)]
    # I- without a matching entity before it starts one (conlleval / seqeval default)
    assert task.spans(["O", "I-person", "I-person", "I-location"]) == [("person", 1, 3), ("location", 3, 4)]
    assert task.spans(["O", "O"]) == []


def test_target_text_and_template():
    row = {"tokens": ["Emma", "visited", "New", "York", "."], "tags": ["B-person", "O", "B-location", "I-location", "O"]}
    assert task.target(row) == "person: Emma\nlocation: New York"
    assert task.target({"tokens": ["hi"], "tags": ["O"]}) == "none"
    user = task.to_example(row, types=["location", "person"])["messages"][1]["content"]
    assert user == "Find the named entities in the text. Entity types: location, person.\n\nText: Emma visited New York ."
    assert task.context([row]) == {"types": ["location", "person"]}


def test_gold_target_parses_back_on_shared_data():
    for split in ("validation", "test"):
        rows = shared_rows("ner", split)
        assert round_trip(task, rows) == [task.spans(r["tags"]) for r in rows]
    rows = shared_rows("ner", "train")
    same = sum(p == task.spans(r["tags"]) for p, r in zip(round_trip(task, rows), rows))
    # The only misses: an entity whose exact text also occurs, untagged, earlier in the sentence.
    assert same >= len(rows) - 3


def test_parse_is_robust_to_format_noise():
    row = {"tokens": "I watched Star Wars with emma in New York".split(), "tags": ["O"] * 9}
    output = ("Here are the entities:\n- **Creative Work**: \"Star Wars\"\n2. Person: Emma, Location: new york;\n"
              "animal: cat\nperson: Bob")
    assert task.parse(output, row, types=TYPES) == [
        ("creative-work", 2, 4), ("person", 5, 6), ("location", 7, 9)]
    assert task.parse("none", row, types=TYPES) == []
    assert task.parse("", row, types=TYPES) == []


def test_parse_repeated_entities_in_order():
    row = {"tokens": ["Paris", "and", "paris", "and", "Paris"], "tags": ["B-location", "O", "O", "O", "B-location"]}
    assert task.parse(task.target(row), row) == [("location", 0, 1), ("location", 4, 5)]
    assert task.parse("location: Paris\nlocation: Paris\nlocation: Paris", row) == [
        ("location", 0, 1), ("location", 2, 3), ("location", 4, 5)]


def test_parse_ignores_spacing_inside_entities():
    row = {"tokens": ["Go", "to", "U.S", ".", "now"], "tags": ["O", "O", "B-location", "I-location", "O"]}
    assert task.parse("location: U.S.", row, types=["location"]) == [("location", 2, 4)]
    html = {"tokens": ["Steve", "&quot;", "Stylez", "&quot;", "!"], "tags": ["B-person"] + ["I-person"] * 3 + ["O"]}
    assert task.parse(task.target(html), html, types=["person"]) == [("person", 0, 4)]


def test_entity_f1_by_hand():
    rows = [{"tokens": list("abcde"), "tags": ["B-per", "I-per", "O", "B-loc", "O"]},
            {"tokens": list("abc"), "tags": ["B-org", "O", "O"]}]
    predictions = [[("per", 0, 2), ("loc", 3, 5)], [("org", 0, 1), ("per", 2, 3)]]
    metrics = task.score(predictions, rows)
    # 2 correct of 4 predicted and 3 gold entities
    assert metrics["precision"] == pytest.approx(2 / 4)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert metrics["per_type"]["per"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert metrics["per_type"]["loc"]["f1"] == 0.0 and metrics["per_type"]["org"]["f1"] == 1.0
    assert task.score([[]], [{"tokens": ["x"], "tags": ["O"]}])["f1"] == 0.0


def test_check_codes():
    assert task.check({"tokens": ["a", "b"], "tags": ["B-x", "I-x"]}) == []
    assert task.check({"tokens": ["a"]}) == [("missing_field", "`tags` is missing")]
    assert task.check({"tokens": ["a", "b"], "tags": ["O"]})[0][0] == "length_mismatch"
    assert task.check({"tokens": ["a"], "tags": ["PER"]})[0][0] == "invalid_tag"
    assert task.check({"tokens": ["a", "b"], "tags": ["O", "I-x"]}) == [
        ("invalid_iob2", "tags[1] is I-x after O; read as the start of an entity", "warning")]
