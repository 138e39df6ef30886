import pytest

from slmtune.tasks import qa as task
from tests.tasks.shared import round_trip, shared_rows


def test_template_with_and_without_context():
    row = {"context": "Paris is the capital of France.", "question": "What is the capital of France?",
           "answers": ["Paris"]}
    system, user, assistant = task.to_example(row)["messages"]
    assert user["content"] == "Context: Paris is the capital of France.\n\nQuestion: What is the capital of France?"
    assert assistant["content"] == "Paris"
    closed = task.to_example({"question": "Q?", "answers": ["A"]})["messages"][1]["content"]
    assert closed == "Question: Q?"


def test_gold_target_parses_back_on_shared_data():
    rows = shared_rows("qa", "validation")
    predictions = round_trip(task, rows)
    assert task.score(predictions, rows)["exact_match"] == 1.0
    assert all(task.normalize_answer(p) == task.normalize_answer(r["answers"][0]) for p, r in zip(predictions, rows))


@pytest.mark.parametrize("output", ["Paris", "paris.", "Answer: Paris", "The answer is Paris.", "**Paris**",
                                    '"Paris"', "Paris\n\nParis is the capital of France."])
def test_parse_is_robust(output):
    assert task.normalize_answer(task.parse(output, {"question": "q", "answers": ["Paris"]})) == "paris"


def test_squad_normalization_em_and_f1_by_hand():
    assert task.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert task.exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    # pred tokens [cat, sat], gold [cat, sat, down]: P 1, R 2/3 -> F1 0.8
    assert task.token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert task.token_f1("dog", "cat") == 0.0
    rows = [{"question": "q", "answers": ["a cat sat down", "cat sat"]}, {"question": "q", "answers": ["blue"]}]
    metrics = task.score(["the cat sat", "red"], rows)
    assert metrics["exact_match"] == pytest.approx(0.5)  # best over answers: "cat sat"
    assert metrics["f1"] == pytest.approx(0.5)


def test_check():
    assert task.check({"question": "q", "answers": ["a"]}) == []
    assert task.check({"question": "q"}) == [("missing_field", "`answers` is missing")]
    assert task.check({"question": "q", "answers": []})[0][0] == "missing_field"
