"""Preference tuning (DPO, ORPO): the data format and its checks, the losses against the formulas
written out here, the reference model, packing, resume, and a whole run from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from slmtune.cli import main
from slmtune.config import recipe_from_dict
from slmtune.data.tokenize import IGNORE, encode_pair
from slmtune.data.validate import validate_file
from slmtune.models import load_model
from slmtune.training import events
from slmtune.training.objectives.dpo import DPOLoss
from slmtune.training.objectives.orpo import ORPOLoss
from slmtune.training.objectives.preference import FedPair, collate_pairs
from slmtune.training.rundir import RunDir
from slmtune.training.run import run
from tests.conftest import write_jsonl

TOPICS = ["the lamp", "the battery", "the charger", "the app", "the warranty", "the colour", "the base",
          "the cable", "the light", "the timer", "the dimmer", "the box"]


def openai_pair(i: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    return {"input": {"messages": [{"role": "user", "content": f"Tell me about {topic}."}]},
            "preferred_output": [{"role": "assistant", "content": f"Sure! {topic} is great."}],
            "non_preferred_output": [{"role": "assistant", "content": f"{topic} exists."}]}


def trl_pair(i: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    return {"prompt": f"Tell me about {topic}.", "chosen": f"Sure! {topic} is great.", "rejected": f"{topic} exists."}


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", [openai_pair(i) for i in range(24)])


# --- data ------------------------------------------------------------------------------------------
BAD = [
    ("missing_output", {"input": {"messages": [{"role": "user", "content": "hi"}]},
                        "preferred_output": [{"role": "assistant", "content": "a"}]}),
    ("empty_output", openai_pair(0) | {"non_preferred_output": [{"role": "assistant", "content": "  "}]}),
    ("identical_outputs", openai_pair(0) | {"non_preferred_output": openai_pair(0)["preferred_output"]}),
    ("not_one_assistant_message", openai_pair(0) | {"preferred_output": [{"role": "user", "content": "x"}]}),
    ("not_one_assistant_message", openai_pair(0) | {"preferred_output": openai_pair(0)["preferred_output"] * 2}),
    ("no_user_turn", openai_pair(0) | {"input": {"messages": [{"role": "system", "content": "be nice"}]}}),
    ("missing_messages", openai_pair(0) | {"input": {}}),
    ("identical_outputs", trl_pair(0) | {"rejected": trl_pair(0)["chosen"]}),
    ("missing_output", {"prompt": "hi", "chosen": "a"}),
]


@pytest.mark.parametrize("code,row", BAD, ids=[f"{c}-{i}" for i, (c, _) in enumerate(BAD)])
def test_each_bad_pair_has_its_code_and_line(code, row, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [openai_pair(i) for i in range(11)] + [row])
    report = validate_file(path)
    assert report.format == "preference"
    assert [(i.code, i.line) for i in report.errors if i.code == code] == [(code, 12)], report.issues
    assert main(["data", "validate", str(path)]) == 1


def test_too_few_pairs(tmp_path):
    report = validate_file(write_jsonl(tmp_path / "p.jsonl", [trl_pair(i) for i in range(3)]))
    assert [i.code for i in report.errors] == ["too_few_examples"]


@pytest.mark.parametrize("shape", [openai_pair, trl_pair])
def test_both_shapes_render_the_same_prompt_and_learn_only_the_answers(shape, tiny_tokenizer):
    pair = encode_pair(shape(1), tiny_tokenizer)
    same = encode_pair(openai_pair(1), tiny_tokenizer)
    assert pair.chosen.input_ids == same.chosen.input_ids and pair.rejected.input_ids == same.rejected.input_ids
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the battery."}],
                                                add_generation_prompt=True, tokenize=True, return_dict=True)
    n = len(prompt["input_ids"])
    for sequence in (pair.chosen, pair.rejected):
        assert sequence.input_ids[:n] == list(prompt["input_ids"])  # the same prompt tokens
        # targets are shifted: position t predicts token t+1; the prompt predicts nothing but the answer's first token
        assert all(t == IGNORE for t in sequence.targets[: n - 1])
        assert sequence.targets[n - 1 : -1] == sequence.input_ids[n:]
        assert tiny_tokenizer.eos_token_id in sequence.targets  # the end of turn is learned


# --- losses ----------------------------------------------------------------------------------------
def lora_model(model_dir, seed=0):
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(load_model(str(model_dir)), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    return model.train()


def answer_logprobs(model, sequence) -> torch.Tensor:
    """The reference computation: one sequence alone through the whole model, log-softmax over the
    full logits, summed at the answer's target positions."""
    ids = torch.tensor([sequence.input_ids])
    logits = model(input_ids=ids).logits[0].float()
    targets = torch.tensor(sequence.targets)
    keep = targets != IGNORE
    return torch.log_softmax(logits[keep], -1).gather(-1, targets[keep][:, None]).sum()


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_dpo_loss_and_gradients_equal_the_formula(tiny_llama_dir, tiny_tokenizer, sft_weight):
    pairs = [encode_pair(openai_pair(i), tiny_tokenizer) for i in range(3)]
    cfg = recipe_from_dict({"model": "x/y", "data": {"train": "p"}, "output": {"dir": "o"},
                            "train": {"objective": {"name": "dpo", "beta": 0.3, "label_smoothing": 0.1,
                                                    "sft_weight": sft_weight}}}).train.objective
    model = lora_model(tiny_llama_dir)
    batch = collate_pairs([[FedPair(p)] for p in pairs], tiny_tokenizer.pad_token_id, "sdpa")
    loss = DPOLoss(model, cfg, "adapter_disabled")(batch)
    loss.backward()
    ours = grads(model)
    model.zero_grad()

    expected = 0.0
    for pair in pairs:
        with torch.no_grad(), model.disable_adapter():
            ref_c, ref_r = answer_logprobs(model, pair.chosen), answer_logprobs(model, pair.rejected)
        chosen = answer_logprobs(model, pair.chosen)
        h = 0.3 * ((chosen - ref_c) - (answer_logprobs(model, pair.rejected) - ref_r))
        expected = expected - 0.9 * F.logsigmoid(h) - 0.1 * F.logsigmoid(-h)
        expected = expected - sft_weight * chosen / sum(t != IGNORE for t in pair.chosen.targets)  # RPO term
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-3, atol=1e-5)


def test_orpo_loss_and_gradients_equal_the_formula(tiny_llama_dir, tiny_tokenizer):
    pairs = [encode_pair(trl_pair(i), tiny_tokenizer) for i in range(3)]
    cfg = recipe_from_dict({"model": "x/y", "data": {"train": "p"}, "output": {"dir": "o"},
                            "train": {"objective": {"name": "orpo", "beta": 0.2}}}).train.objective
    model = lora_model(tiny_llama_dir)
    batch = collate_pairs([[FedPair(p)] for p in pairs], tiny_tokenizer.pad_token_id, "sdpa")
    loss = ORPOLoss(model, cfg)(batch)
    loss.backward()
    ours = grads(model)
    model.zero_grad()

    expected = 0.0
    for pair in pairs:
        means = []
        for seq in (pair.chosen, pair.rejected):
            n = sum(t != IGNORE for t in seq.targets)
            means.append(answer_logprobs(model, seq) / n)
        odds = [m - torch.log(1 - torch.exp(m)) for m in means]
        expected = expected - means[0] - 0.2 * F.logsigmoid(odds[0] - odds[1])
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-3, atol=1e-5)


def test_reference_with_the_adapter_disabled_is_the_base_model(tiny_llama_dir, tiny_tokenizer):
    from slmtune.training.loss import sequence_logprobs

    pairs = [encode_pair(openai_pair(i), tiny_tokenizer) for i in range(2)]
    batch = collate_pairs([[FedPair(p)] for p in pairs], tiny_tokenizer.pad_token_id, "sdpa")
    model = lora_model(tiny_llama_dir)
    with torch.no_grad():
        with model.disable_adapter():
            disabled = sequence_logprobs(model, batch, None)[0]
        adapted = sequence_logprobs(model, batch, None)[0]
        base = sequence_logprobs(load_model(str(tiny_llama_dir)), batch, None)[0]
    torch.testing.assert_close(disabled, base)
    assert not torch.allclose(adapted, base)  # the adapter (non-zero here) does change them


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_packed_pairs_give_the_loss_and_gradients_of_unpacked_ones(objective, tiny_llama_dir, tiny_tokenizer):
    from slmtune.training.attention import use_per_example_attention

    pairs = [FedPair(encode_pair(openai_pair(i), tiny_tokenizer)) for i in range(4)]
    cfg = recipe_from_dict({"model": "x/y", "data": {"train": "p"}, "output": {"dir": "o"},
                            "train": {"objective": objective}}).train.objective
    results = []
    for packed in (False, True):
        model = lora_model(tiny_llama_dir)
        use_per_example_attention(model)
        rows = [pairs[:3], pairs[3:]] if packed else [[p] for p in pairs]  # three pairs (six sequences) in a row
        batch = collate_pairs(rows, tiny_tokenizer.pad_token_id, "sdpa")
        module = DPOLoss(model, cfg, "adapter_disabled") if objective == "dpo" else ORPOLoss(model, cfg)
        loss = module(batch)
        loss.backward()
        results.append((loss.item(), grads(model), module.metric_sums))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert metrics_a == pytest.approx(metrics_b, rel=1e-4, abs=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


# --- whole runs ------------------------------------------------------------------------------------
def pref_recipe(model_dir, data, out, objective="dpo", method="lora", **train):
    return recipe_from_dict({
        "model": {"name": str(model_dir)},
        "method": {"name": method} | ({"lora_r": 4, "lora_alpha": 8} if method == "lora" else {}),
        "data": {"train": str(data), "max_length": 96, "validation_split": 0.25},
        "train": {"objective": objective, "max_steps": 6, "examples_per_step": 4, "learning_rate": 5e-3,
                  "precision": "fp32", "log_every": 1} | train,
        "output": {"dir": str(out)},
    })


@pytest.mark.parametrize("objective,method", [("dpo", "lora"), ("orpo", "lora"), ("dpo", "full")])
def test_resume_reproduces_an_uninterrupted_run(objective, method, tiny_llama_dir, pairs_file, tmp_path):
    lr = {"learning_rate": 1e-3} if method == "full" else {}
    straight = run(pref_recipe(tiny_llama_dir, pairs_file, tmp_path / "a", objective, method, save_every=3, **lr),
                   progress=False)

    class Crash(Exception):
        pass

    def crash_after_first_checkpoint(event):
        if isinstance(event, events.Checkpoint):
            raise Crash

    recipe = pref_recipe(tiny_llama_dir, pairs_file, tmp_path / "b", objective, method, save_every=3, **lr)
    with pytest.raises(Crash):
        run(recipe, on_event=crash_after_first_checkpoint, progress=False)
    resumed = run(recipe, resume=True, progress=False)
    a, b = RunDir(tmp_path / "a").metrics(), RunDir(tmp_path / "b").metrics()
    assert [e.step for e in a] == [e.step for e in b]
    for x, y in zip(a, b):
        assert x.KIND == y.KIND
        if isinstance(x, events.Best):
            assert x.value == pytest.approx(y.value, rel=1e-5)
            continue
        assert (x.loss if isinstance(x, events.Step) else x.eval_loss) == pytest.approx(
            y.loss if isinstance(y, events.Step) else y.eval_loss, rel=1e-5)
        assert x.metrics == pytest.approx(y.metrics, rel=1e-4, abs=1e-6)
    assert resumed.summary["eval_metrics"] == pytest.approx(straight.summary["eval_metrics"], rel=1e-4, abs=1e-6)


def test_dpo_from_the_cli_learns_the_preference(tiny_llama_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(pairs_file), "--objective", "dpo",
                 "--output", str(out), "train.max_steps=12", "train.examples_per_step=4", "train.learning_rate=5e-3",
                 "data.validation_split=0.25", "train.eval_every=6", "--no-progress"]) == 0
    steps = [e for e in RunDir(out).metrics() if isinstance(e, events.Step)]
    assert set(steps[0].metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                                     "nll/chosen"}  # sft_weight 1 by default (RPO)
    assert steps[0].metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    summary = RunDir(out).summary()
    assert summary["objective"] == "dpo" and summary["eval_metrics"]["rewards/margin"] > 0
    assert summary["eval_metrics"]["rewards/accuracy"] >= 0.8
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_objective_and_data_must_match(tiny_llama_dir, pairs_file, chat_file, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(pairs_file), "--output",
                 str(tmp_path / "a")]) == 2
    assert "preference data, but train.objective sft" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(chat_file), "--objective", "orpo",
                 "--output", str(tmp_path / "b")]) == 2
    assert "chat data, but train.objective orpo learns from preference data" in capsys.readouterr().err


def test_dpo_continues_from_an_sft_adapter(tiny_llama_dir, pairs_file, chat_file, tmp_path):
    sft = run(recipe_from_dict({"model": {"name": str(tiny_llama_dir)}, "method": {"name": "lora", "lora_r": 4,
                                                                                   "lora_alpha": 8},
                                "data": {"train": str(chat_file)}, "train": {"max_steps": 2, "learning_rate": 5e-3},
                                "output": {"dir": str(tmp_path / "sft")}}), progress=False)
    recipe = pref_recipe(tiny_llama_dir, pairs_file, tmp_path / "dpo", max_steps=2)
    recipe.model.adapter = str(sft.run_dir)
    result = run(recipe, progress=False)
    first = [e for e in RunDir(result.run_dir).metrics() if isinstance(e, events.Step)][0]
    # The reference is the SFT model (precomputed): the policy starts equal to it.
    assert first.metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    bad = pref_recipe(tiny_llama_dir, pairs_file, tmp_path / "bad", max_steps=1)
    bad.method.lora_r = 8
    bad.model.adapter = str(sft.run_dir)
    with pytest.raises(Exception, match="does not fit this recipe's method settings"):
        run(bad, progress=False)
