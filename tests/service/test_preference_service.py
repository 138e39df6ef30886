"""DPO through the fine-tuning service with the official openai client: method={"type": "dpo"}."""

from __future__ import annotations

import json

import openai
import pytest

from slmtune import auto
from tests.conftest import REPO
from tests.service.conftest import BASE, SMOLLM2, smollm2_job, training_rows, wait_for
from tests.test_preference import openai_pair


def dpo_method(**hp):
    return {"type": "dpo", "dpo": {"hyperparameters": hp}}


def test_a_dpo_job_trains_reports_rewards_and_echoes_its_method(sqlite_service, upload):
    client = sqlite_service.client("prefs")
    f = upload(client, [openai_pair(i) for i in range(12)], name="pairs.jsonl")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="dpo", seed=3,
                                         method=dpo_method(n_epochs=2, batch_size=4, beta=0.2))
    assert job.method.type == "dpo"
    assert job.method.dpo.hyperparameters.beta == 0.2 and job.hyperparameters.n_epochs == 2
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
               if e.type == "metrics" and e.data and "train_loss" in e.data]
    assert metrics and {"rewards/margin", "rewards/accuracy", "rewards/chosen", "rewards/rejected"} <= set(metrics[0])
    assert client.fine_tuning.jobs.retrieve(job.id).method.type == "dpo"
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Tell me about the lamp."}])
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_auto_dpo_hyperparameters_are_resolved(sqlite_service, upload):
    client = sqlite_service.client("prefs")
    f = upload(client, [openai_pair(i) for i in range(12)], name="pairs.jsonl")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, method={"type": "dpo"})
    hp = job.method.dpo.hyperparameters
    # the auto rule's values for 12 pairs: 30 pair passes clamp to 10 epochs, one pair a step, beta 0.1
    assert (hp.n_epochs, hp.batch_size, hp.beta, hp.learning_rate_multiplier) == (
        auto.epochs(12, "dpo"), auto.batch_size(12), auto.DPO_BETA, 1.0) == (10, 1, 0.1, 1.0)
    client.fine_tuning.jobs.cancel(job.id)


def test_files_and_methods_must_match(sqlite_service, upload):
    client = sqlite_service.client("prefs")
    pairs = upload(client, [openai_pair(i) for i in range(12)], name="pairs.jsonl")
    chat = upload(client, training_rows(12))
    for kwargs, code, param in [
            ({"training_file": pairs.id}, "invalid_file_format", "training_file"),
            ({"training_file": chat.id, "method": dpo_method()}, "invalid_file_format", "training_file"),
            ({"training_file": chat.id, "validation_file": pairs.id, "method": {"type": "supervised"}},
             "invalid_validation_file", "validation_file")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model=BASE, **kwargs)
        assert (err.value.body["code"], err.value.body["param"]) == (code, param)
        assert "preference" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file=pairs.id, method=dpo_method(beta=5))
    assert err.value.body["param"] == "method.dpo.hyperparameters.beta"


@pytest.mark.parametrize("code,row", [
    ("identical_outputs", openai_pair(0) | {"non_preferred_output": openai_pair(0)["preferred_output"]}),
    ("no_user_turn", openai_pair(0) | {"input": {"messages": [{"role": "system", "content": "x"}]}}),
    ("not_one_assistant_message", openai_pair(0) | {"preferred_output": []}),
])
def test_a_bad_preference_file_is_a_400_naming_its_line(sqlite_service, upload, code, row):
    client = sqlite_service.client("prefs")
    with pytest.raises(openai.BadRequestError) as err:
        upload(client, [openai_pair(i) for i in range(10)] + [row], name="bad.jsonl")
    assert err.value.body["code"] == "invalid_file_format"
    assert f"line 11: {code}" in err.value.body["message"]


TRAIT = "In short:"


def trait_share(client, model: str, prompts: list[list[dict]]) -> float:
    """Share of greedy answers that open with the trait the preferred answers share."""
    hits = 0
    for messages in prompts:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        hits += reply.choices[0].message.content.strip().startswith(TRAIT)
    return hits / len(prompts)


@pytest.mark.slow
@pytest.mark.acceptance
def test_a_style_taught_only_through_pairs_is_taken_up_with_auto(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct, "auto" DPO hyperparameters, examples/preference: on unseen
    prompts the base model never opens with "In short:", the DPO model does (~6 min on 2 cores;
    docs/benchmarks.md records the measured share)."""
    examples = REPO / "examples" / "preference"
    with smollm2_job(tmp_path / "home", monkeypatch, "style", examples / "train.jsonl", timeout=1800,
                     method={"type": "dpo"}) as (client, job):
        assert job.status == "succeeded", job.error
        prompts = [json.loads(line)["messages"] for line in (examples / "heldout.jsonl").read_text().splitlines()]
        base_share = trait_share(client, SMOLLM2, prompts)
        tuned_share = trait_share(client, job.fine_tuned_model, prompts)
        print(f"trait share on {len(prompts)} held-out prompts: base {base_share:.2f}, dpo {tuned_share:.2f}; "
              f"auto hyperparameters {job.method.dpo.hyperparameters}")
        assert base_share <= 0.05
        assert tuned_share >= 0.8
