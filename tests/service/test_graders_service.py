"""The grader endpoints through the official openai client: validate and run, OpenAI's shapes, 400s
naming the field, python graders refused unless the operator allows them, score_model on the
served model."""

from __future__ import annotations

import openai
import pytest

from slmtune.graders import FIRST_NUMBER
from tests.service.conftest import BASE

EXACT = {"type": "string_check", "name": "exact", "operation": "eq", "input": "{{sample.output_text}}",
         "reference": "{{item.answer}}"}
SIMILAR = {"type": "text_similarity", "name": "similar", "evaluation_metric": "fuzzy_match",
           "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}


def test_validate_and_run_a_grader(sqlite_service):
    client = sqlite_service.client("graders")
    assert client.fine_tuning.alpha.graders.validate(grader=EXACT).grader.name == "exact"
    run = client.fine_tuning.alpha.graders.run(grader=EXACT, model_sample="Paris", item={"answer": "Paris"})
    assert run.reward == 1.0 and run.metadata.errors.invalid_variable_error is False
    assert run.metadata.type == "string_check" and run.metadata.name == "exact"
    both = {"type": "multi", "name": "both", "graders": {"exact": EXACT, "similar": SIMILAR},
            "calculate_output": "0.25 * exact + 0.75 * similar"}
    run = client.fine_tuning.alpha.graders.run(grader=both, model_sample="Pariss", item={"answer": "Paris"})
    assert run.sub_rewards["exact"] == 0.0 and run.reward == pytest.approx(0.75 * run.sub_rewards["similar"])
    missing = client.fine_tuning.alpha.graders.run(grader=EXACT, model_sample="Paris", item={})
    assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error is True


@pytest.mark.parametrize("grader,param", [
    (EXACT | {"operation": "contains"}, "grader.operation"),
    ({"type": "multi", "graders": {"exact": EXACT}, "calculate_output": "__import__('os')"}, "grader.calculate_output"),
    ({"type": "python", "source": "def grade(sample, item):\n    return 1.0\n"}, "grader.type"),
    ({"type": "score_model", "model": "gpt-4o", "input": [{"role": "user", "content": "Rate it"}]}, "grader.model"),
    (SIMILAR | {"evaluation_metric": "cosine"}, "grader.evaluation_metric"),
])
def test_bad_graders_are_400s_naming_the_field(sqlite_service, grader, param):
    client = sqlite_service.client("graders")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.alpha.graders.validate(grader=grader)
    assert err.value.body["param"] == param and err.value.body["code"] == "invalid_grader"
    if grader["type"] == "python":
        assert "--allow-python-graders" in err.value.body["message"]


def test_a_score_model_grader_asks_the_served_model(sqlite_service):
    client = sqlite_service.client("graders")
    grader = {"type": "score_model", "name": "judge", "model": BASE, "range": [0, 1],
              "input": [{"role": "user", "content": "Rate {{sample.output_text}} from 0 to 1."}],
              "sampling_params": {"max_completions_tokens": 8, "seed": 1}}
    run = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="Paris")
    assert run.metadata.errors.model_grader_server_error is False
    # The tiny random model answers noise: the grader's reward is what its answer to the rendered
    # prompt says, the first number clamped to the range, or 0 with a parse error.
    answer = client.chat.completions.create(model=BASE, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": "Rate Paris from 0 to 1."}]).choices[0].message.content
    found = FIRST_NUMBER.search(answer)
    assert run.metadata.errors.model_grader_parse_error is (found is None)
    assert run.reward == (min(1.0, max(0.0, float(found.group()))) if found else 0.0)
