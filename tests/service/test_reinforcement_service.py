"""Reinforcement fine-tuning through the service with the official openai client:
method={"type": "reinforcement", "reinforcement": {"grader": ..., "hyperparameters": ...}}."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.conftest import REPO
from tests.service.conftest import BASE, smollm2_job, training_rows, wait_for
from tests.test_grpo import EXACT, FUZZY_A

PROMPTS = [{"messages": [{"role": "user", "content": f"Say a word {i}"}], "answer": "a"} for i in range(16)]


def rft_method(grader=FUZZY_A, **hp):
    return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}}


def test_validate_run_train_follow_and_chat(sqlite_service, upload):
    """What an OpenAI RFT user does, unchanged: test the grader, create the job, follow it, use the model."""
    client = sqlite_service.client("rft")
    assert client.fine_tuning.alpha.graders.validate(grader=FUZZY_A).grader.type == "text_similarity"
    graded = client.fine_tuning.alpha.graders.run(grader=FUZZY_A, model_sample="aaaa", item={"answer": "a"})
    assert 0 < graded.reward < 1 and graded.metadata.errors.sample_parse_error is False

    f = upload(client, PROMPTS, name="prompts.jsonl")
    held_apart = upload(client, PROMPTS[:4], name="valid.jsonl")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, validation_file=held_apart.id, suffix="rft",
                                         seed=5, method=rft_method(
        n_epochs=1, batch_size=4, eval_interval=2, compute_multiplier=0.5, reasoning_effort="low"))
    assert job.method.type == "reinforcement"
    hp = job.method.reinforcement.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.eval_interval, hp.compute_multiplier) == (1, 4, 2, 0.5)
    assert hp.eval_samples > 0 and job.method.reinforcement.grader.name == FUZZY_A["name"]
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e.data for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
    assert len(steps) == 4  # 16 prompts, batch 4, one epoch
    assert {"reward", "reward_std", "zero_spread_groups", "completion_length"} <= set(steps[0])
    assert any("reward=" in e.message for e in events)
    evaluations = [e.data for e in events if e.type == "metrics" and e.data and "valid_loss" in e.data]
    assert [e["step"] for e in evaluations][::-1] == [2, 4]  # eval_interval 2 and the end
    assert all(e["valid_loss"] == pytest.approx(1 - e["valid_reward"]) for e in evaluations)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    metrics = [c.to_dict()["metrics"] for c in checkpoints]
    final = next(m for m in metrics if m.get("final"))
    assert "valid_reward" in final and all("reward" in m for m in metrics if not m.get("final"))
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Say a word"}])
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_auto_reinforcement_hyperparameters_are_resolved(sqlite_service, upload):
    client = sqlite_service.client("rft")
    f = upload(client, PROMPTS, name="prompts.jsonl")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, method=rft_method())
    hp = job.method.reinforcement.hyperparameters
    assert hp.n_epochs >= 1 and hp.batch_size >= 1 and hp.eval_interval >= 1 and hp.eval_samples >= 1
    assert hp.compute_multiplier == 1.0 and hp.reasoning_effort == "default"
    client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.parametrize("method,param,fragment", [
    (rft_method(EXACT | {"operation": "contains"}), "method.reinforcement.grader.operation", "operation"),
    (rft_method({"type": "python", "name": "p", "source": "def grade(s, i): return 1"}),
     "method.reinforcement.grader", "--allow-python-graders"),
    (rft_method({"type": "multi", "graders": {"a": EXACT}, "calculate_output": "open('x')"}),
     "method.reinforcement.grader.calculate_output", "calculate_output"),
    (rft_method({"type": "score_model", "name": "s", "model": "/etc/passwd", "input": [
        {"role": "user", "content": "Score {{sample.output_text}}"}]}), "method.reinforcement.grader.model", "model"),
    # The file's rows lack the field the grader reads: a 400 at creation, not a failed job.
    (rft_method(EXACT | {"reference": "{{item.expected}}"}), "method.reinforcement.grader", "expected"),
    (rft_method(batch_size=0), "method.reinforcement.hyperparameters.batch_size", "batch_size"),
    (rft_method(reasoning_effort="extreme"), "method.reinforcement.hyperparameters.reasoning_effort", "reasoning"),
    (rft_method(beta=0.1), "method.reinforcement.hyperparameters.beta", "Unknown hyperparameter"),
    # One tenant's step is bounded: at most 64 prompts x 32 answers, 256 validation prompts.
    (rft_method(batch_size=65), "method.reinforcement.hyperparameters.batch_size", "64"),
    (rft_method(compute_multiplier=5), "method.reinforcement.hyperparameters.compute_multiplier", "4"),
    (rft_method(eval_samples=1000), "method.reinforcement.hyperparameters.eval_samples", "256"),
    (rft_method({"type": "score_model", "name": "s", "model": BASE, "sampling_params": {"temperature": 7},
                 "input": [{"role": "user", "content": "Score {{sample.output_text}}"}]}),
     "method.reinforcement.grader.sampling_params", "temperature"),
])
def test_bad_reinforcement_jobs_are_400s_with_param(sqlite_service, upload, method, param, fragment):
    client = sqlite_service.client("rft")
    f = upload(client, PROMPTS, name="prompts.jsonl")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file=f.id, method=method)
    assert err.value.body["param"].startswith(param), err.value.body
    assert fragment in err.value.body["message"], err.value.body


def test_a_prompt_too_long_for_training_is_a_400_at_creation(sqlite_service, upload):
    client = sqlite_service.client("rft")
    long = {"messages": [{"role": "user", "content": "word " * 1500}], "answer": "a"}
    f = upload(client, PROMPTS[:12] + [long], name="long.jsonl")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file=f.id, method=rft_method())
    assert err.value.body["param"] == "training_file"
    assert f"{f.id}:13: the prompt has" in err.value.body["message"], err.value.body


def test_files_and_methods_must_match(sqlite_service, upload):
    client = sqlite_service.client("rft")
    prompts = upload(client, PROMPTS, name="prompts.jsonl")
    chat = upload(client, training_rows(12))
    for kwargs in ({"training_file": chat.id, "method": rft_method()},
                   {"training_file": prompts.id, "method": {"type": "supervised"}},
                   {"training_file": prompts.id, "method": {"type": "dpo"}}):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model=BASE, **kwargs)
        assert (err.value.body["code"], err.value.body["param"]) == ("invalid_file_format", "training_file")
    with pytest.raises(openai.BadRequestError) as err:  # no grader
        client.fine_tuning.jobs.create(model=BASE, training_file=prompts.id, method={"type": "reinforcement"})
    assert "grader" in err.value.body["message"]


@pytest.mark.acceptance
def test_smollm2_learns_terse_exact_answers_with_auto_hyperparameters(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct, a 240-prompt reinforcement job with "auto" hyperparameters
    and examples/rft's grader: on the 60 held-apart prompts at least 60% of the answers are exactly
    the value (the base model: none). It prints its minutes; how long it takes is the machine's
    (18 minutes on 2 cores of an AMX CPU, 30 on an AVX512-BF16 AMD EPYC: docs/results.md),
    a figure for docs, not an assertion (machines here drift 2-3x within minutes)."""
    examples = REPO / "examples" / "rft"
    grader = json.loads((examples / "grader.json").read_text())
    started = time.monotonic()
    with smollm2_job(tmp_path / "home", monkeypatch, "rft", examples / "train.jsonl", timeout=5400,
                     method={"type": "reinforcement", "reinforcement": {"grader": grader}}) as (client, job):
        assert job.status == "succeeded", job.error
        minutes = (time.monotonic() - started) / 60
        exact = 0
        rows = [json.loads(line) for line in (examples / "test.jsonl").read_text().splitlines()]
        for row in rows:
            reply = client.chat.completions.create(model=job.fine_tuned_model, messages=row["messages"],
                                                   temperature=0, max_tokens=32)
            exact += reply.choices[0].message.content.strip() == row["answer"]
        print(f"reinforcement job: {minutes:.1f} min, exact {exact}/{len(rows)}, "
              f"hyperparameters {job.method.reinforcement.hyperparameters}")
        assert exact >= 0.6 * len(rows)
