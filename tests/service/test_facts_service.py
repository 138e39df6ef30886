"""The #22 promise through the service: a user's own facts, taught with "auto" hyperparameters, are
answered on paraphrased questions (examples/product_facts: 25 facts x 3 conversations)."""

from __future__ import annotations

import json

import pytest

from slmtune.scoring import states_fact
from tests.conftest import REPO
from tests.service.conftest import SMOLLM2, smollm2_job


def facts_right(client, model: str, system: str, questions: list[dict]) -> int:
    """Held-out questions whose greedy answer contains the expected fact (case-insensitive); the
    misses are printed."""
    right = 0
    for item in questions:
        reply = client.chat.completions.create(model=model, temperature=0, max_tokens=60, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": item["question"]}])
        text = reply.choices[0].message.content or ""
        ok = states_fact(text, item["answer_contains"])
        right += ok
        if not ok:
            print(f"  {model}: {item['question']!r} -> {text[:120]!r} (expects {item['answer_contains'][0]!r})")
    return right


@pytest.mark.slow
@pytest.mark.acceptance
def test_auto_hyperparameters_teach_a_users_facts(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct, a job with every hyperparameter "auto" on 75 conversations:
    at least 23 of the 25 paraphrased held-out questions are answered with the right fact, where the
    base model knows none of them (docs/benchmarks.md records the measured count)."""
    examples = REPO / "examples" / "product_facts"
    system = json.loads((examples / "train.jsonl").open().readline())["messages"][0]["content"]
    questions = [json.loads(line) for line in (examples / "heldout.jsonl").read_text().splitlines()]
    assert len(questions) == 25
    with smollm2_job(tmp_path / "home", monkeypatch, "facts", examples / "train.jsonl", timeout=2400) as (client, job):
        assert job.status == "succeeded", job.error
        base = facts_right(client, SMOLLM2, system, questions)
        tuned = facts_right(client, job.fine_tuned_model, system, questions)
        print(f"facts right on {len(questions)} paraphrased questions: base {base}, fine-tuned {tuned}; "
              f"auto hyperparameters {job.hyperparameters}")
        assert base <= 2
        assert tuned >= 23
