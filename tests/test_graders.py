"""Graders (#24, part 2): every type and operation on documented-style examples, templates, the
formula evaluator's refusals, the python sandbox's limits, and OpenAI's error flags."""

from __future__ import annotations

import pytest

from slmtune.grader_sandbox import run_python
from slmtune.graders import GraderError, check_grader, grade, item_fields, parse_formula, GradingFailed

ITEM = {"answer": "Paris", "reference_answer": "The capital of France is Paris.", "meta": {"unit": "km"}}


def string_check(operation: str, reference: str = "{{item.answer}}") -> dict:
    return {"type": "string_check", "name": "check", "operation": operation,
            "input": "{{sample.output_text}}", "reference": reference}


@pytest.mark.parametrize("operation,sample,reward", [
    ("eq", "Paris", 1.0), ("eq", "paris", 0.0), ("eq", "Paris.", 0.0),
    ("ne", "Lyon", 1.0), ("ne", "Paris", 0.0),
    ("like", "It is Paris.", 1.0), ("like", "It is paris.", 0.0),
    ("ilike", "It is PARIS.", 1.0), ("ilike", "It is Lyon.", 0.0),
])
def test_string_check(operation, sample, reward):
    assert grade(string_check(operation), sample, ITEM).reward == reward


def similarity(metric: str) -> dict:
    return {"type": "text_similarity", "name": "sim", "evaluation_metric": metric,
            "input": "{{sample.output_text}}", "reference": "{{item.reference_answer}}"}


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3",
                                    "rouge_4", "rouge_5", "rouge_l"])
def test_text_similarity_is_one_for_the_reference_and_lower_for_other_text(metric):
    same = grade(similarity(metric), ITEM["reference_answer"], ITEM)
    other = grade(similarity(metric), "Bananas are yellow and curved fruit.", ITEM)
    close = grade(similarity(metric), "The capital of France is Paris, of course.", ITEM)
    assert same.errors == {} and same.reward == pytest.approx(1.0, abs=0.01)  # METEOR's fragment penalty: 0.998
    assert 0.0 <= other.reward < close.reward < 1.0


def test_text_similarity_values_match_the_libraries_definitions():
    assert grade(similarity("fuzzy_match"), "The capital of France is Pari.", ITEM).reward == pytest.approx(
        1 - 1 / 61, abs=1e-3)  # one deletion in 31 + 30 characters: rapidfuzz's normalized InDel ratio
    assert grade(similarity("rouge_1"), "capital France Paris", ITEM).reward == pytest.approx(
        2 * 1.0 * (3 / 6) / (1.0 + 3 / 6))  # precision 3/3, recall 3/6


def test_cosine_needs_an_embedding_model():
    with pytest.raises(GraderError) as err:
        check_grader(similarity("cosine"))
    assert err.value.param == "grader.evaluation_metric" and "embedding model" in str(err.value)


def test_templates_reach_nested_item_fields_and_sample_json():
    grader = {"type": "string_check", "name": "unit", "operation": "eq", "input": "{{ sample.output_json.unit }}",
              "reference": "{{item.meta.unit}}"}
    assert grade(grader, '{"unit": "km"}', ITEM).reward == 1.0
    result = grade(grader, "km", ITEM)  # not JSON: output_json is absent
    assert result.reward == 0.0 and result.errors["sample_parse_error"]
    missing = grade(string_check("eq", "{{item.nothing}}"), "Paris", ITEM)
    assert missing.reward == 0.0 and missing.errors["invalid_variable_error"]
    assert item_fields(grader) == {"meta"} and item_fields(string_check("eq")) == {"answer"}


def multi(formula: str) -> dict:
    return {"type": "multi", "name": "both", "calculate_output": formula, "graders": {
        "exact": string_check("eq"), "similar": similarity("fuzzy_match") | {"reference": "{{item.answer}}"}}}


def test_multi_combines_sub_rewards_with_the_formula():
    result = grade(multi("0.5 * exact + 0.5 * similar"), "Paris", ITEM)
    assert result.reward == pytest.approx(1.0) and result.sub_rewards == {"exact": 1.0, "similar": 1.0}
    result = grade(multi("max(exact, similar) - abs(-0.25) / (1 + 1)"), "Pariss", ITEM)
    assert result.sub_rewards["exact"] == 0.0 and result.reward == pytest.approx(result.sub_rewards["similar"] - 0.125)


@pytest.mark.parametrize("formula", [
    "__import__('os').system('true')", "exact.__class__", "exact if similar else 1", "exact ** 2",
    "[exact][0]", "open('x')", "unknown + 1", "lambda: 1", "exact; similar", "", "min", "'a' + 'b'", "True",
    "exact // 2", "exact % 2",
])
def test_the_formula_evaluator_refuses_anything_but_arithmetic_over_grader_names(formula):
    with pytest.raises(GraderError) as err:
        check_grader(multi(formula))
    assert err.value.param == "grader.calculate_output"


def test_a_formula_that_divides_by_zero_is_a_flag_not_a_crash():
    result = grade(multi("exact / (similar - similar)"), "Paris", ITEM)
    assert result.reward == 0.0 and result.errors["formula_parse_error"]


BAD_GRADERS = [
    ({"type": "regex"}, "grader.type"),
    ({"type": "string_check", "input": "x", "reference": "y"}, "grader.operation"),
    (string_check("contains"), "grader.operation"),
    (similarity("bleurt"), "grader.evaluation_metric"),
    (similarity("bleu") | {"pass_threshold": 2}, "grader.pass_threshold"),
    ({"type": "python", "source": "x = 1"}, "grader.source"),
    ({"type": "score_model", "model": "m", "input": []}, "grader.input"),
    ({"type": "score_model", "model": "m", "input": [{"role": "user", "content": "x"}], "range": [1, 0]}, "grader.range"),
    ({"type": "multi", "calculate_output": "a", "graders": {"a": {"type": "string_check"}}}, "grader.graders.a.input"),
    ({"type": "multi", "calculate_output": "min", "graders": {"min": string_check("eq")}}, "grader.graders"),
]


@pytest.mark.parametrize("grader,param", BAD_GRADERS)
def test_a_bad_grader_names_its_field(grader, param):
    with pytest.raises(GraderError) as err:
        check_grader(grader)
    assert err.value.param == param


def test_python_graders_can_be_refused_with_the_reason():
    with pytest.raises(GraderError, match="--allow-python-graders"):
        check_grader({"type": "python", "source": "def grade(sample, item):\n    return 1\n"}, python_allowed=False)


def test_score_model_parses_and_clamps_the_models_score():
    grader = {"type": "score_model", "name": "judge", "model": "judge-model", "range": [0, 1],
              "input": [{"role": "user", "content": "Score {{sample.output_text}} against {{item.answer}}."}]}
    asked = []

    def ask(model, messages, params):
        asked.append((model, messages))
        return "Score: 1.7 (very good)"

    result = grade(grader, "Paris", ITEM, ask=ask)
    assert result.reward == 1.0 and asked == [("judge-model", [{"role": "user", "content": "Score Paris against Paris."}])]
    unparsable = grade(grader, "Paris", ITEM, ask=lambda *a: "I cannot rate this.")
    assert unparsable.reward == 0.0 and unparsable.errors["model_grader_parse_error"]
    assert grade(grader, "Paris", ITEM).errors["model_grader_server_error"]  # no model to ask


def test_metadata_has_every_openai_error_flag():
    metadata = grade(string_check("eq", "{{item.nothing}}"), "Paris", ITEM).metadata(string_check("eq"))
    assert metadata["errors"]["invalid_variable_error"] is True and metadata["errors"]["other_error"] is False
    assert {"name", "type", "errors", "execution_time", "scores"} <= set(metadata)


# --- the python sandbox --------------------------------------------------------------------------------
PYTHON = {"type": "python", "name": "py"}


def python_grade(body: str, sample="Paris"):
    return grade(PYTHON | {"source": f"def grade(sample, item):\n{body}\n"}, sample, ITEM, run_python=run_python)


def test_a_python_grader_scores_in_a_subprocess():
    result = python_grade("    return float(sample['output_text'] == item['answer'])")
    assert result.reward == 1.0 and result.errors == {}
    assert python_grade("    import os\n    return float(len(os.listdir('.')) <= 2 and 'OPENAI_API_KEY' not in os.environ "
                        "and 'HOME' not in os.environ)").reward == 1.0


@pytest.mark.parametrize("body,words", [
    ("    while True:\n        pass", "CPU"),
    ("    x = bytearray(4 << 30)\n    return 1", "MemoryError"),
    ("    import socket\n    socket.create_connection(('127.0.0.1', 5432))\n    return 1", "not allowed"),
    ("    import subprocess\n    subprocess.run(['true'])\n    return 1", "not allowed"),
    ("    raise ValueError('bad sample')", "bad sample"),
    ("    return 'high'", "ValueError"),
    ("    return float('nan')", "finite"),
])
def test_the_sandbox_stops_bad_graders(body, words):
    result = python_grade(body)
    assert result.reward == 0.0 and result.errors["python_grader_runtime_error"]
    assert words in result.errors["python_grader_runtime_error_details"], result.errors


def test_sandbox_failures_are_grading_failures():
    with pytest.raises(GradingFailed):
        run_python("def grade(sample, item):\n    return None\n", {"output_text": ""}, {})
    with pytest.raises(GradingFailed):
        parse_formula("exact +", {"exact"})


# --- reinforcement rows and `slmtune grade` -------------------------------------------------------------
def test_validate_checks_reinforcement_rows_against_the_graders_fields(tmp_path, capsys):
    import json

    from slmtune.cli import main
    from tests.conftest import write_jsonl

    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps(string_check("eq")))
    rows = [{"messages": [{"role": "user", "content": f"Capital of country {i}?"}], "answer": "Paris"}
            for i in range(10)]
    rows[3] = {"messages": rows[3]["messages"]}
    rows[6] = {"messages": rows[6]["messages"] + [{"role": "assistant", "content": "Paris"}], "answer": "Paris"}
    data = write_jsonl(tmp_path / "rft.jsonl", rows)
    assert main(["data", "validate", str(data), "--grader", str(grader)]) == 1
    out = capsys.readouterr().out
    assert f"{data}:4: error missing_grader_field: `answer` is missing" in out
    assert f"{data}:7: error last_message_not_user" in out
    grader.write_text(json.dumps(string_check("contains")))
    assert main(["data", "validate", str(data), "--grader", str(grader)]) == 1
    assert "error invalid_grader: grader.operation" in capsys.readouterr().out


def test_slmtune_grade_answers_and_grades_a_file(tmp_path, tiny_llama_dir, capsys):
    import json

    from slmtune.cli import main
    from tests.conftest import write_jsonl

    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps({"type": "multi", "name": "score", "calculate_output": "0.5 * exact + 0.5 * similar",
                                  "graders": {"exact": string_check("eq"), "similar": similarity("fuzzy_match") |
                                              {"reference": "{{item.answer}}"}}}))
    data = write_jsonl(tmp_path / "rft.jsonl", [{"messages": [{"role": "user", "content": f"Say {w}."}], "answer": w}
                                                for w in ("yes", "no", "maybe")])
    out = tmp_path / "graded.json"
    assert main(["grade", "--grader", str(grader), "--data", str(data), "--model", str(tiny_llama_dir),
                 "--max-new-tokens", "4", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n"] == 3 and 0.0 <= result["mean_reward"] <= 1.0
    assert f"mean reward {result['mean_reward']:.4f}" in printed
    for sample in result["samples"]:
        assert sample["reward"] == pytest.approx(0.5 * sample["sub_rewards"]["exact"] + 0.5 * sample["sub_rewards"]["similar"])
