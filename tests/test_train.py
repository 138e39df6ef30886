import json
import math

import pytest
import torch

from slmtune.config import recipe_from_dict
from slmtune.data.batching import collate
from slmtune.data.tokenize import encode
from slmtune.methods import lora
from slmtune.models import load_model, load_tokenizer
from slmtune.training import events
from slmtune.training.run import run
from slmtune.training.loop import accumulate_gradients
from tests.conftest import chat_example, write_jsonl


def make_recipe(model_dir, data, out, **train):
    return recipe_from_dict({
        "model": {"name": str(model_dir)},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(data), "max_length": 128},
        "train": {"micro_batch_size": 4, "learning_rate": 5e-3, "seed": 3, "precision": "fp32", **train},
        "output": {"dir": str(out)},
    })


def test_accumulation_4x2_equals_one_batch_of_8(tiny_llama_dir):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    examples = [encode("chat", chat_example(f"Question {i}?" * (1 + i % 3), f"Answer {i}" * (1 + i % 2)),
                       tokenizer, None) for i in range(8)]
    pad = tokenizer.pad_token_id

    def grads(groups):
        torch.manual_seed(0)
        model = lora.prepare(load_model(str(tiny_llama_dir)), lora.Config(lora_r=4, lora_dropout=0.0))
        # LoRA's B starts at zero, which would make A's gradients vanish; give it values.
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        batches = [collate([[e] for e in group], pad, False) for group in groups]
        loss = accumulate_gradients(model, batches, None)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_8, grads_8 = grads([examples])
    loss_4x2, grads_4x2 = grads([examples[i : i + 2] for i in range(0, 8, 2)])
    assert loss_4x2 == pytest.approx(loss_8, rel=1e-6)
    for name in grads_8:
        torch.testing.assert_close(grads_4x2[name], grads_8[name], rtol=1e-5, atol=1e-7)


def test_only_lora_parameters_change_and_loss_goes_down(tiny_model_dir, chat_file, tmp_path):
    before = load_model(str(tiny_model_dir)).state_dict()
    recipe = make_recipe(tiny_model_dir, chat_file, tmp_path / "run", max_steps=30, learning_rate=1e-2)
    recipe.method.lora_r, recipe.method.lora_alpha = 16, 32
    result = run(recipe, progress=False)
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s["event"] == "step"]
    assert losses[-1] < losses[0] - 0.5  # from ln(vocab) ~ 6.0
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(result.run_dir / "adapter"))
    changed = set()
    for name, value in model.named_parameters():
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            changed.add(name)
            continue
        torch.testing.assert_close(value, before[base_name], rtol=0, atol=0)
    assert changed and all("lora_A" in n or "lora_B" in n for n in changed)
    lora_b = [v for n, v in model.named_parameters() if "lora_B" in n]
    assert any(v.abs().sum() > 0 for v in lora_b)


def test_resume_reproduces_an_uninterrupted_run(tiny_llama_dir, chat_file, tmp_path):
    straight = run(make_recipe(tiny_llama_dir, chat_file, tmp_path / "a", max_steps=6, save_every=3), progress=False)

    class Crash(Exception):
        pass

    def crash_after_first_checkpoint(event):
        if isinstance(event, events.Checkpoint):
            raise Crash

    recipe = make_recipe(tiny_llama_dir, chat_file, tmp_path / "b", max_steps=6, save_every=3)
    with pytest.raises(Crash):
        run(recipe, on_event=crash_after_first_checkpoint, progress=False)
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = run(recipe, resume=True, progress=False)
    assert resumed.summary["steps"] == 6
    assert resumed.summary["final_train_loss"] == pytest.approx(straight.summary["final_train_loss"], rel=1e-5)
    lines_a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines_b] == [l["step"] for l in lines_a]
    for x, y in zip(lines_a, lines_b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_run_refuses_to_overwrite_an_existing_run(tiny_llama_dir, chat_file, tmp_path):
    from slmtune.config import RecipeError

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(RecipeError, match="--resume"):
        run(make_recipe(tiny_llama_dir, chat_file, tmp_path / "c", max_steps=1), progress=False)
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"


def test_validation_split_and_eval_loss(tiny_llama_dir, chat_file, tmp_path):
    recipe = make_recipe(tiny_llama_dir, chat_file, tmp_path / "v", max_steps=4, eval_every=2)
    recipe.data.validation_split = 0.25
    result = run(recipe, progress=False)
    assert result.summary["validation_examples"] == 6 and result.summary["train_examples"] == 18
    evals = [json.loads(l) for l in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    assert result.summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)


def test_examples_per_step_fixes_the_examples_of_every_step(tiny_llama_dir, chat_file, tmp_path):
    import math

    from slmtune.config import RecipeError

    result = run(make_recipe(tiny_llama_dir, chat_file, tmp_path / "run", epochs=2, examples_per_step=5,
                             micro_batch_size=1), progress=False)
    assert result.summary["steps"] == 2 * math.ceil(24 / 5)
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["event"] == "step"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    # The saved recipe spells out both step sizes (one null) and loads back as it was.
    from slmtune.config import load_recipe

    saved = load_recipe(tmp_path / "run" / "recipe.yaml").train
    assert saved.examples_per_step == 5 and saved.gradient_accumulation_steps is None
    default = load_recipe(_saved(make_recipe(tiny_llama_dir, chat_file, tmp_path / "d"), tmp_path / "d.yaml"))
    assert default.train.gradient_accumulation_steps is None and default.train.examples_per_step is None
    # 4 rows x 2 = 8 rows per step on a large file
    assert default.train.resolved(accelerator=False).resolved_for_data(5000, "lora").gradient_accumulation_steps == 2
    with pytest.raises(RecipeError, match="examples_per_step or gradient_accumulation_steps"):
        make_recipe(tiny_llama_dir, chat_file, tmp_path / "x", examples_per_step=5, gradient_accumulation_steps=2)


def _lever_case(model_dir):
    """A LoRA model with non-zero B (so every adapter weight gets a gradient) and one packed batch."""
    tokenizer = load_tokenizer(str(model_dir))
    examples = [encode("chat", chat_example(f"Question {i}?" * (1 + i % 3), f"Answer {i}" * (1 + i % 2)),
                       tokenizer, None) for i in range(6)]
    torch.manual_seed(0)
    model = lora.prepare(load_model(str(model_dir)), lora.Config(lora_r=4, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model, collate([examples[:3], examples[3:]], tokenizer.pad_token_id, True)


def _loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lm_head_at_target_positions_only_equals_full_logits_cross_entropy(tiny_model_dir):
    from slmtune.data.tokenize import IGNORE
    from slmtune.training.loss import target_loss_sum

    model, batch = _lever_case(tiny_model_dir)

    def full_logits_loss():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                                 ignore_index=IGNORE, reduction="sum")

    loss, grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, None))
    full_loss, full_grads = _loss_and_grads(model, full_logits_loss)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("trains_head", [False, True], ids=["lora", "full-tied-head"])
def test_fused_cross_entropy_equals_plain(tiny_model_dir, amp_dtype, trains_head):
    from slmtune.training.loss import target_loss_sum

    model, batch = _lever_case(tiny_model_dir)
    if trains_head:
        # Full fine-tuning of a model whose head shares the embedding matrix: the head's gradient
        # made in forward must add up with the embedding's in backward.
        model = model.get_base_model()
        model.lm_head.weight = model.get_input_embeddings().weight
        for p in model.parameters():
            p.requires_grad_(True)
    assert int(batch["n_targets"]) > 7  # several chunks of 3, the last one shorter
    plain, plain_grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, amp_dtype, "plain") / 7)
    fused, fused_grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, amp_dtype, "fused", 3) / 7)
    assert fused == pytest.approx(plain, rel=1e-5)
    for name in plain_grads:
        if amp_dtype is None:
            torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)
        else:
            # bf16 rounds (softmax - one-hot) before the 1/7 scale in the fused path, after it in the
            # plain one: single elements differ by bf16 rounding, each gradient as a whole agrees.
            difference = (fused_grads[name] - plain_grads[name]).norm() / plain_grads[name].norm()
            assert difference < 2e-2, name
    with torch.no_grad():
        assert target_loss_sum(model, batch, amp_dtype, "fused", 3).item() == pytest.approx(plain * 7, rel=1e-5)


def test_cross_entropy_setting_reaches_training_and_keeps_the_loss(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    import slmtune.training.loss

    def recipe(name, **train):
        made = make_recipe(tiny_llama_dir, chat_file, tmp_path / name, max_steps=2, **train)
        made.data.validation_split = 0.25
        return made

    plain = run(recipe("plain", cross_entropy="plain"), progress=False)
    chunks = []
    fused_loss = slmtune.training.loss.linear_cross_entropy_sum
    monkeypatch.setattr(slmtune.training.loss, "linear_cross_entropy_sum", lambda *a: chunks.append(a[4]) or fused_loss(*a))
    fused = run(recipe("fused", loss_chunk_tokens=3), progress=False)
    assert chunks and set(chunks) == {3}
    assert fused.summary["final_train_loss"] == pytest.approx(plain.summary["final_train_loss"], rel=1e-5)
    assert fused.summary["eval_loss"] == pytest.approx(plain.summary["eval_loss"], rel=1e-5)


def test_gradient_checkpointing_and_bf16_autocast_keep_loss_and_gradients(tiny_llama_dir):
    from slmtune.training.loss import target_loss_sum

    model, batch = _lever_case(tiny_llama_dir)
    loss, grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, None))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ckpt_loss, ckpt_grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, None))
    assert ckpt_loss == pytest.approx(loss, rel=1e-6)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-5, atol=1e-7)
    # bf16 autocast keeps 8 bits of mantissa: the loss moves by well under a percent.
    bf16_loss, bf16_grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, torch.bfloat16))
    assert bf16_loss == pytest.approx(loss, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in bf16_grads.values()]), torch.cat([g.flatten() for g in grads.values()]), dim=0)
    assert cosine > 0.99


def _saved(recipe, path):
    import yaml

    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path


@pytest.mark.parametrize("method, precision, extra, frozen_dtype, expected", [
    ({"name": "lora"}, "bf16", {}, "auto", "bfloat16"),
    ({"name": "dora"}, "bf16", {}, "auto", "bfloat16"),
    ({"name": "lora"}, "fp32", {}, "auto", "float32"),
    ({"name": "full"}, "bf16", {}, "auto", "float32"),
    ({"name": "lora", "lora_init": "pissa"}, "bf16", {}, "auto", "float32"),
    ({"name": "lora"}, "bf16", {"distributed": "zero3"}, "auto", "float32"),
    ({"name": "lora"}, "bf16", {"distributed": "ddp"}, "auto", "bfloat16"),
    ({"name": "lora"}, "fp32", {}, "bfloat16", "bfloat16"),
    ({"name": "lora"}, "bf16", {}, "float32", "float32"),
])
def test_frozen_base_dtype(tiny_llama_dir, chat_file, tmp_path, method, precision, extra, frozen_dtype, expected):
    from slmtune.methods import METHODS
    from slmtune.training.run import resolve_frozen_dtype

    recipe = recipe_from_dict({"model": {"name": str(tiny_llama_dir), "frozen_dtype": frozen_dtype}, "method": method,
                               "data": {"train": str(chat_file)}, "train": {"precision": precision, **extra},
                               "output": {"dir": str(tmp_path)}})
    assert resolve_frozen_dtype(recipe, METHODS[method["name"]], torch.device("cpu"), quantized=False) == expected


def test_full_fine_tuning_refuses_a_bf16_base(tiny_llama_dir, chat_file, tmp_path):
    from slmtune.config import RecipeError

    with pytest.raises(RecipeError, match="full fine-tuning trains every weight"):
        recipe_from_dict({"model": {"name": str(tiny_llama_dir), "frozen_dtype": "bfloat16"}, "method": {"name": "full"},
                          "data": {"train": str(chat_file)}, "output": {"dir": str(tmp_path)}})


def test_a_bf16_frozen_base_gives_the_fp32_base_loss_and_gradients_under_bf16_autocast(tiny_model_dir):
    from slmtune.training.loss import target_loss_sum

    model, batch = _lever_case(tiny_model_dir)
    loss, grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, torch.bfloat16))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    bf16_loss, bf16_grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, torch.bfloat16))
    assert bf16_loss == pytest.approx(loss, rel=1e-2)
    assert all(g.dtype == torch.float32 for g in bf16_grads.values())  # the adapters stay fp32
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in bf16_grads.values()]), torch.cat([g.flatten() for g in grads.values()]), dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_adapter_methods_train_on_a_bf16_base(tiny_llama_dir, chat_file, tmp_path, method):
    from safetensors.torch import load_file

    recipe = recipe_from_dict({
        "model": {"name": str(tiny_llama_dir), "frozen_dtype": "bfloat16"}, "method": {"name": method},
        "data": {"train": str(chat_file), "max_length": 128},
        "train": {"max_steps": 2, "micro_batch_size": 4, "precision": "bf16", "learning_rate": 1e-3},
        "output": {"dir": str(tmp_path / "run")}})
    result = run(recipe, progress=False)
    assert result.summary["frozen_dtype"] == "bfloat16"
    assert math.isfinite(result.summary["final_train_loss"])
    saved = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


@pytest.mark.parametrize("accelerator, micro, accumulation, expected", [
    (False, "auto", None, (1, 8)),   # CPU: one packed row per forward pass, 8 rows per step
    (True, "auto", None, (4, 2)),
    (False, 4, None, (4, 2)),
    (False, 3, None, (3, 2)),
    (False, 16, None, (16, 1)),
    (True, "auto", 5, (4, 5)),
])
def test_step_size_resolution(accelerator, micro, accumulation, expected):
    from slmtune import auto
    from slmtune.config import TrainSection

    cfg = TrainSection(micro_batch_size=micro, gradient_accumulation_steps=accumulation).resolved(accelerator)
    large = cfg.resolved_for_data(5000, "lora")
    assert (large.micro_batch_size, large.gradient_accumulation_steps, large.examples_per_step) == expected + (None,)
    # A small file without a step size steps every few examples, as a service job of it would.
    small = cfg.resolved_for_data(75, "lora")
    if accumulation is None:
        assert small.gradient_accumulation_steps is None and small.examples_per_step == auto.batch_size(75) == 1
    else:
        assert small.gradient_accumulation_steps == accumulation and small.examples_per_step is None
    per_example = TrainSection(examples_per_step=8).resolved(accelerator).resolved_for_data(75, "lora")
    assert per_example.gradient_accumulation_steps is None and per_example.examples_per_step == 8


def test_run_saves_the_resolved_step_size(tiny_llama_dir, chat_file, tmp_path):
    recipe = recipe_from_dict({
        "model": {"name": str(tiny_llama_dir)}, "method": {"name": "lora", "lora_r": 4},
        "data": {"train": str(chat_file), "max_length": 128}, "train": {"max_steps": 1, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")}})
    assert recipe.train.micro_batch_size == "auto"
    run(recipe, progress=False)
    from slmtune.config import load_recipe

    saved = load_recipe(tmp_path / "run" / "recipe.yaml").train
    # 24 examples and no step size: 1 example per step (slmtune/auto.py batch_size), as a service job.
    assert (saved.micro_batch_size, saved.gradient_accumulation_steps, saved.examples_per_step) == (1, None, 1)


@pytest.mark.parametrize("kernel", ["math", "flash"])
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_example_attention_equals_the_block_diagonal_mask(tiny_model_dir, amp_dtype, kernel, monkeypatch):
    from slmtune.training import attention
    from slmtune.training.attention import use_per_example_attention
    from slmtune.training.loss import target_loss_sum

    # These examples are short: every one takes the math kernel unless the limit is 0.
    monkeypatch.setattr(attention, "MATH_ATTENTION_MAX_TOKENS", 256 if kernel == "math" else 0)
    model, batch = _lever_case(tiny_model_dir)
    widths = [sum(n for _, n in spans) for spans in batch["packed_examples"]]
    assert len(set(widths)) == 2 and max(widths) == batch["input_ids"].shape[1]  # one row is padded
    masked = _loss_and_grads(model, lambda: target_loss_sum(model, batch, amp_dtype))
    use_per_example_attention(model)
    # The spans alone decide who attends to whom: a mask letting every token see the whole row
    # must change nothing.
    unmasked = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"]).tril()}
    per_example = _loss_and_grads(model, lambda: target_loss_sum(model, unmasked, amp_dtype))
    if amp_dtype is None:
        assert per_example[0] == pytest.approx(masked[0], rel=1e-5)
        for name, grad in masked[1].items():
            torch.testing.assert_close(per_example[1][name], grad, rtol=1e-4, atol=1e-6)
        return
    # bf16: the two kernels round differently; both gradients must agree to bf16's precision.
    assert per_example[0] == pytest.approx(masked[0], rel=1e-2)
    for name, grad in masked[1].items():
        assert (per_example[1][name] - grad).norm() <= 2e-2 * grad.norm(), name


def test_per_example_attention_falls_back_to_the_mask_without_spans(tiny_llama_dir):
    from slmtune.training.attention import use_per_example_attention
    from slmtune.training.loss import target_loss_sum

    model, batch = _lever_case(tiny_llama_dir)
    without_spans = {k: v for k, v in batch.items() if k != "packed_examples"}
    with torch.no_grad():
        masked = target_loss_sum(model, without_spans, None)
        use_per_example_attention(model)
        assert target_loss_sum(model, without_spans, None) == pytest.approx(masked.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapters_skipping_the_input_upcast_under_bf16_autocast_give_the_same_loss_and_gradients(tiny_llama_dir,
                                                                                                  method):
    from slmtune.methods import METHODS
    from slmtune.methods.peft_common import skip_adapter_input_upcast
    from slmtune.training.loss import target_loss_sum

    module = METHODS[method]
    _, batch = _lever_case(tiny_llama_dir)
    torch.manual_seed(0)
    model = module.prepare(load_model(str(tiny_llama_dir), dtype="bfloat16"), module.Config())
    for name, p in model.named_parameters():
        if p.requires_grad:  # away from the initial values (LoRA's B = 0, IA3's ones) so every path counts
            torch.nn.init.normal_(p, mean=1.0 if method == "ia3" else 0.0, std=0.05)
    upcast, upcast_grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, torch.bfloat16))
    skip_adapter_input_upcast(model)
    skipping = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", True) is False]
    assert bool(skipping) == (method != "dora")  # DoRA keeps the cast (its magnitude path is not autocast)
    skipped, skipped_grads = _loss_and_grads(model, lambda: target_loss_sum(model, batch, torch.bfloat16))
    assert skipped == upcast
    for name in upcast_grads:
        torch.testing.assert_close(skipped_grads[name], upcast_grads[name], rtol=0, atol=0)
