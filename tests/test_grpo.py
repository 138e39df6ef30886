"""GRPO (`train.objective: grpo`, reinforcement fine-tuning): advantages, the loss against a formula
written out here, equal-reward groups, resume, data and recipe errors, and a tiny model learning a
synthetic reward."""

from __future__ import annotations

import json

import pytest
import torch

from slmtune.cli import main
from slmtune.config import RecipeError, recipe_from_dict
from slmtune.data.formats import DataError
from slmtune.data.validate import validate_file
from slmtune.graders import JUDGE_MAX_TOKENS, GraderError, check_grader, judge_sampling
from slmtune.data.tokenize import IGNORE
from slmtune.training import events
from slmtune.training.objectives.grpo import (GRPOLoss, Sample, collate_samples, group_advantages,
                                              sample_example)
from slmtune.training.rundir import RunDir
from slmtune.training.run import run
from tests.conftest import write_jsonl
from tests.test_preference import grads, lora_model

# Rewards how close the answer is to "aaaaaaaa": a random tiny model can move toward it.
FUZZY_A = {"type": "text_similarity", "name": "as", "evaluation_metric": "fuzzy_match",
           "input": "{{sample.output_text}}", "reference": "aaaaaaaa"}
EXACT = {"type": "string_check", "name": "exact", "operation": "eq", "input": "{{sample.output_text}}",
         "reference": "{{item.answer}}"}


def prompts_file(path, n=40, answer=True):
    return write_jsonl(path, [{"messages": [{"role": "user", "content": f"Say a word {i}"}]}
                              | ({"answer": "a"} if answer else {}) for i in range(n)])


def grpo_recipe(model_dir, data, out, method="full", grader=FUZZY_A, **objective_and_train):
    train = {k: v for k, v in objective_and_train.items() if k not in ("beta", "loss_normalization")}
    objective = {"name": "grpo", "grader": grader, "max_completion_tokens": 8, "prompts_per_step": 4,
                 "num_generations": 8, "eval_samples": 8} | {
        k: v for k, v in objective_and_train.items() if k in ("beta", "loss_normalization")}
    return recipe_from_dict({
        "model": {"name": str(model_dir)},
        "method": method if isinstance(method, dict) else
        {"name": method} | ({"lora_r": 4, "lora_alpha": 8} if method == "lora" else {}),
        "data": {"train": str(data), "max_length": 64, "validation_split": 0.2},
        "train": {"objective": objective, "max_steps": 6, "learning_rate": 3e-3, "precision": "fp32",
                  "eval_every": 3} | train,
        "output": {"dir": str(out)},
    })


# --- advantages ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rewards,scale,expected", [
    ([[1.0, 0.0]], "group", [[0.7071, -0.7071]]),           # (r - 0.5) / (std 0.7071 + 1e-4)
    ([[1.0, 0.0, 0.0, 0.0]], "none", [[0.75, -0.25, -0.25, -0.25]]),
    ([[0.1, 0.1, 0.1]], "group", [[0.0, 0.0, 0.0]]),        # equal rewards: exactly 0, whatever rounding
    ([[0.3, 0.3], [0.0, 1.0]], "group", [[0.0, 0.0], [-0.7071, 0.7071]]),
])
def test_group_advantages(rewards, scale, expected):
    out = group_advantages(torch.tensor(rewards), scale)
    torch.testing.assert_close(out, torch.tensor(expected), atol=2e-4, rtol=0)
    flat = [i for i, row in enumerate(rewards) if len(set(row)) == 1]
    assert all(out[i].eq(0).all() for i in flat)


# --- the loss against the formula ------------------------------------------------------------------
def token_logprobs(model, example) -> torch.Tensor:
    """The reference computation: one sequence alone through the whole model, log-softmax over the
    full logits, at the answer's target positions."""
    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].float()
    targets = torch.tensor(example.targets)
    keep = targets != IGNORE
    return torch.log_softmax(logits[keep], -1).gather(-1, targets[keep][:, None])[:, 0]


def some_samples(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say a word"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    answers = [tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id], tokenizer("fine")["input_ids"],
               tokenizer("the lamp resets")["input_ids"] + [tokenizer.eos_token_id]]
    return [Sample(sample_example(list(prompt), a), adv, 0) for a, adv in zip(answers, (1.2, -0.4, -0.8))]


@pytest.mark.parametrize("normalization", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_grpo_loss_and_gradients_equal_the_formula(normalization, beta, tiny_llama_dir, tiny_tokenizer):
    samples = some_samples(tiny_tokenizer)
    cfg = grpo_recipe(tiny_llama_dir, "p", "o", beta=beta, loss_normalization=normalization).train.objective
    model = lora_model(tiny_llama_dir)
    # Two samples packed in one row, the third alone: packing must not change anything.
    batch = collate_samples([samples[:2], samples[2:]], tiny_tokenizer.pad_token_id, "sdpa")
    loss = GRPOLoss(model, cfg, "adapter_disabled" if beta else None)(batch)
    loss.backward()
    ours = grads(model)
    model.zero_grad()

    expected, kl_total = 0.0, 0.0
    for s in samples:
        logp = token_logprobs(model, s.example)
        ratio = torch.exp(logp - logp.detach())
        per_token = -torch.minimum(ratio * s.advantage, torch.clamp(ratio, 0.8, 1.2) * s.advantage)
        if beta:
            with torch.no_grad(), model.disable_adapter():
                ref = token_logprobs(model, s.example)
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            per_token = per_token + beta * kl
        expected = expected + (per_token.sum() if normalization == "token" else per_token.mean())
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert grads(model).keys() == ours.keys()
    for name, grad in grads(model).items():
        # Packed and unpacked rows sum in different orders: an entry near zero may differ by fp32
        # rounding of the larger ones (seen: 1.6e-6 on a tensor whose largest entry was ~1e-3).
        torch.testing.assert_close(ours[name], grad, rtol=1e-3, atol=1e-6 + 1e-3 * grad.abs().max().item())


def test_a_group_with_equal_rewards_contributes_no_gradient(tiny_llama_dir, tiny_tokenizer):
    samples = some_samples(tiny_tokenizer)
    for s in samples:
        s.advantage = group_advantages(torch.tensor([[0.5, 0.5, 0.5]]))[0, 0].item()
    cfg = grpo_recipe(tiny_llama_dir, "p", "o").train.objective
    model = lora_model(tiny_llama_dir)
    loss = GRPOLoss(model, cfg, None)(collate_samples([samples], tiny_tokenizer.pad_token_id, "sdpa"))
    loss.backward()
    assert loss.item() == 0.0
    assert ours_all_zero(grads(model))


def ours_all_zero(gradients: dict) -> bool:
    return bool(gradients) and all(g.abs().max().item() == 0.0 for g in gradients.values())


# --- whole runs ------------------------------------------------------------------------------------
def step_metrics(event) -> dict:
    return {k: v for k, v in event.metrics.items() if not k.endswith("_seconds")}  # timings differ


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reproduces_an_uninterrupted_run(method, tiny_llama_dir, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl")
    straight = run(grpo_recipe(tiny_llama_dir, data, tmp_path / "a", method, save_every=2), progress=False)

    class Crash(Exception):
        pass

    def crash_after_first_checkpoint(event):
        if isinstance(event, events.Checkpoint):
            raise Crash

    recipe = grpo_recipe(tiny_llama_dir, data, tmp_path / "b", method, save_every=2)
    with pytest.raises(Crash):
        run(recipe, on_event=crash_after_first_checkpoint, progress=False)
    resumed = run(recipe, resume=True, progress=False)
    a, b = RunDir(tmp_path / "a").metrics(), RunDir(tmp_path / "b").metrics()
    assert [(e.KIND, e.step) for e in a] == [(e.KIND, e.step) for e in b]
    steps = [(x, y) for x, y in zip(a, b) if isinstance(x, events.Step)]
    assert len(steps) == 6
    for x, y in steps:  # the samples, their rewards and the update after the resume are the same
        assert step_metrics(x) == pytest.approx(step_metrics(y), rel=1e-5, abs=1e-6)
        assert x.grad_norm == pytest.approx(y.grad_norm, rel=1e-4)
        assert x.loss == pytest.approx(y.loss, rel=1e-4, abs=1e-6)
    assert resumed.summary["eval_metrics"] == straight.summary["eval_metrics"]


def test_a_run_reports_rewards_and_saves_the_grader_inline(tiny_llama_dir, tmp_path):
    grader_file = tmp_path / "grader.json"
    grader_file.write_text(json.dumps({"type": "multi", "name": "m", "graders": {"similar": FUZZY_A, "exact": EXACT},
                                       "calculate_output": "0.5 * similar + 0.5 * exact"}))
    result = run(grpo_recipe(tiny_llama_dir, prompts_file(tmp_path / "p.jsonl"), tmp_path / "run", "lora",
                             grader=str(grader_file), max_steps=2, eval_every=0), progress=False)
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.recipe().train.objective.grader["graders"]["exact"] == EXACT
    [step] = [e for e in run_dir.metrics() if isinstance(e, events.Step)][-1:]
    for key in ("reward", "reward_std", "zero_spread_groups", "completion_length", "reward/similar", "reward/exact",
                "generate_seconds"):
        assert key in step.metrics
    evaluation = result.summary["eval_metrics"]
    for metrics in (step.metrics, evaluation):  # the grader's formula holds for means of its parts
        assert 0.0 <= metrics["reward"] <= 1.0
        assert metrics["reward"] == pytest.approx(0.5 * metrics["reward/similar"] + 0.5 * metrics["reward/exact"],
                                                  abs=2e-6)  # each logged to 6 decimals
    assert result.summary["eval_loss"] == pytest.approx(1 - evaluation["reward"])
    assert {"reward", "reward/similar", "reward/exact", "completion_length"} <= evaluation.keys()
    assert result.summary["objective"] == "grpo" and (run_dir.path / "adapter").is_dir()


def test_rows_must_hold_what_the_grader_reads(tiny_llama_dir, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl", answer=False)
    with pytest.raises(DataError, match=r"p.jsonl:1.*missing_grader_field.*answer"):
        run(grpo_recipe(tiny_llama_dir, data, tmp_path / "run", grader=EXACT), progress=False)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "an answer"}],
             "answer": "a"}]
    with pytest.raises(DataError, match="last_message_not_user"):
        run(grpo_recipe(tiny_llama_dir, write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "run2", grader=EXACT),
            progress=False)


@pytest.mark.parametrize("grader,message", [
    ({"type": "string_check", "operation": "like", "input": "{{sample.output_text}}"}, "reference"),
    ({"type": "multi", "graders": {"a": FUZZY_A}, "calculate_output": "__import__('os')"}, "calculate_output"),
    ("no/such/grader.json", "cannot read grader file"),
])
def test_a_bad_grader_is_a_recipe_error(grader, message, tmp_path):
    with pytest.raises(RecipeError, match=message):
        grpo_recipe("m", "p", tmp_path / "o", grader=grader)


PYTHON = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}


def test_a_python_grader_runs_only_when_the_recipe_allows_it(tmp_path):
    with pytest.raises(RecipeError, match="allow_python_grader: true"):
        grpo_recipe("m", "p", tmp_path / "o", grader=PYTHON)
    recipe = recipe_from_dict({"model": "m", "data": {"train": "p"}, "output": {"dir": "o"}, "train": {
        "objective": {"name": "grpo", "grader": PYTHON, "allow_python_grader": True}}})
    assert recipe.train.objective.allow_python_grader


def test_a_judge_cannot_be_asked_for_long_answers():
    assert judge_sampling({"max_completions_tokens": 10**9, "temperature": 0.5, "seed": 3}) == (JUDGE_MAX_TOKENS, 0.5, 3)
    judge = {"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "x"}]}
    for bad in ({"max_completions_tokens": "many"}, {"temperature": 9}, {"seed": "s"}, [1]):
        with pytest.raises(GraderError) as err:
            check_grader(judge | {"sampling_params": bad})
        assert err.value.param == "grader.sampling_params"


def test_several_processes_and_virtual_tokens_are_refused(tmp_path):
    for strategy in ("ddp", "fsdp"):
        with pytest.raises(RecipeError, match="grpo trains in one process"):
            grpo_recipe("m", "p", tmp_path / "o", distributed=strategy)
    with pytest.raises(RecipeError, match="virtual"):
        recipe_from_dict({"model": "m", "method": "prompt_tuning", "data": {"train": "p"}, "output": {"dir": "o"},
                          "train": {"objective": {"name": "grpo", "grader": EXACT}}})


@pytest.mark.slow
def test_a_tiny_model_learns_a_synthetic_reward(tiny_llama_dir, tmp_path):
    """40 steps of full fine-tuning move a random model's sampled answers toward "aaaaaaaa"."""
    run(grpo_recipe(tiny_llama_dir, prompts_file(tmp_path / "p.jsonl"), tmp_path / "run", max_steps=40,
                    eval_every=0), progress=False)
    rewards = [e.metrics["reward"] for e in RunDir(tmp_path / "run").metrics() if isinstance(e, events.Step)]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > 2 * first, rewards


def test_the_cli_trains_with_a_grader(tiny_llama_dir, tmp_path, capsys):
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps(FUZZY_A))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(prompts_file(tmp_path / "p.jsonl")),
                 "--grader", str(grader), "--method", "full", "--output", str(out), "--no-progress",
                 "train.max_steps=2", "train.objective.max_completion_tokens=4", "train.precision=fp32"]) == 0
    saved = RunDir(out).recipe().train.objective
    assert saved.name == "grpo" and saved.grader == FUZZY_A and saved.max_completion_tokens == 4
    assert main(["train", "--model", "m", "--data", "d", "--grader", str(grader), "--objective", "dpo"]) != 0
    assert "--grader trains with train.objective grpo" in capsys.readouterr().err


def test_prompt_files_are_reinforcement_data_and_need_a_grader_to_train(tiny_llama_dir, tmp_path):
    data = prompts_file(tmp_path / "p.jsonl")
    report = validate_file(data)
    assert (report.format, report.n_examples, report.n_errors) == ("reinforcement", 40, 0)
    # One answerless row in a chat file stays the chat file's error.
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"}]}]
                        + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 12)
    report = validate_file(mixed)
    assert report.format == "chat" and [(i.code, i.line) for i in report.errors] == [("no_assistant_message", 1)]
    with pytest.raises(RecipeError, match="train.objective grpo with a grader"):
        run(recipe_from_dict({"model": str(tiny_llama_dir), "data": {"train": str(data)}, "output": {"dir": str(tmp_path / "o")},
                              "train": {"max_steps": 1}}), progress=False)


@pytest.mark.parametrize("method", [{"name": "qlora", "lora_r": 4, "lora_alpha": 8, "compute_dtype": "float32"},
                                    {"name": "dora", "lora_r": 4, "lora_alpha": 8}])
def test_quantized_and_dora_adapters_train_with_a_kl_to_their_base(method, tiny_llama_dir, tmp_path):
    result = run(grpo_recipe(tiny_llama_dir, prompts_file(tmp_path / "p.jsonl"), tmp_path / "run", method,
                             beta=0.1, max_steps=2, eval_every=0), progress=False)
    steps = [e for e in RunDir(tmp_path / "run").metrics() if isinstance(e, events.Step)]
    assert len(steps) == 2 and all(e.metrics["kl"] >= 0 for e in steps)
    assert steps[0].metrics["kl"] == pytest.approx(0, abs=1e-6)  # before the first update: the policy is its base
    assert steps[-1].grad_norm > 0 and result.summary["method"] == method["name"]
    assert (tmp_path / "run" / "adapter").is_dir()
