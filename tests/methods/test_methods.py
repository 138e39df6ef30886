"""Every method, table-driven, on tiny Llama and Phi-3 models: it trains (loss goes down), only its
own parameters change, its saved weights load back to identical outputs, and merging is exact."""

import json

import pytest
import torch

from slmtune.config import recipe_from_dict
from slmtune.export.merged import load_merged, merge
from slmtune.methods import METHODS
from slmtune.models import load_model
from slmtune.training.run import run

# method section, learning rate
CASES = {
    "lora": ({"name": "lora", "lora_r": 8, "lora_alpha": 16}, 1e-2),
    "lora-rslora": ({"name": "lora", "lora_r": 8, "lora_alpha": 16, "use_rslora": True}, 1e-2),
    "lora-pissa": ({"name": "lora", "lora_r": 8, "lora_alpha": 8, "lora_init": "pissa"}, 1e-2),
    "lora-olora": ({"name": "lora", "lora_r": 8, "lora_alpha": 8, "lora_init": "olora"}, 1e-2),
    "dora": ({"name": "dora", "lora_r": 8, "lora_alpha": 16}, 1e-2),
    "qlora-nf4": ({"name": "qlora", "lora_r": 8, "lora_alpha": 16, "compute_dtype": "float32"}, 1e-2),
    "qlora-fp4": ({"name": "qlora", "lora_r": 8, "lora_alpha": 16, "quant_type": "fp4", "double_quant": False,
                   "compute_dtype": "float32"}, 1e-2),
    "qlora-8bit": ({"name": "qlora", "lora_r": 8, "lora_alpha": 16, "quant_bits": 8}, 1e-2),
    "full": ({"name": "full", "freeze_layers": 1}, 1e-3),
    "ia3": ({"name": "ia3"}, 5e-2),
    "prompt_tuning": ({"name": "prompt_tuning", "num_virtual_tokens": 4}, 3e-1),
    "prefix_tuning": ({"name": "prefix_tuning", "num_virtual_tokens": 4}, 3e-1),
}
MERGEABLE = {"lora", "lora-rslora", "lora-pissa", "lora-olora", "dora", "qlora-nf4", "ia3", "full"}
# Methods whose initialisation rewrites the frozen weights (the final adapter is converted back).
REWRITES_BASE = {"lora-pissa", "lora-olora"}


def test_every_method_is_covered():
    assert {c[0]["name"] for c in CASES.values()} == set(METHODS)


def train_run(model_dir, data, out, method, lr, steps=12):
    # micro_batch_size 32 covers the whole file: every step sees the same data, so the loss must fall.
    recipe = recipe_from_dict({
        "model": {"name": str(model_dir)}, "method": method,
        "data": {"train": str(data), "max_length": 128},
        "train": {"max_steps": steps, "micro_batch_size": 32, "gradient_accumulation_steps": 1, "learning_rate": lr,
                  "precision": "fp32", "seed": 1,
                  "warmup_ratio": 0.0},
        "output": {"dir": str(out)},
    })
    return run(recipe, progress=False)


def sample_ids(model_dir):
    torch.manual_seed(5)
    return torch.randint(5, 300, (2, 12))


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_and_changes_only_its_parameters(case, tiny_model_dir, chat_file, tmp_path):
    method, lr = CASES[case]
    result = train_run(tiny_model_dir, chat_file, tmp_path / "run", method, lr)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0], losses
    module = METHODS[method["name"]]
    artifact = result.run_dir / module.artifact
    assert artifact.is_dir() and not (result.run_dir / ("model" if module.artifact == "adapter" else "adapter")).exists()
    base = load_model(str(tiny_model_dir)).state_dict()
    if module.artifact == "model":
        trained = load_model(str(artifact)).state_dict()
        changed = {k for k in base if not torch.equal(base[k], trained[k])}
        assert changed and not any(k.startswith("model.layers.0.") for k in changed)
        assert any(k.startswith("model.layers.1.") for k in changed)
        return
    from safetensors.torch import load_file

    weights = load_file(artifact / "adapter_model.safetensors")
    assert weights and result.summary["trainable_params"] < 0.5 * result.summary["total_params"]
    # Only adapter tensors are saved, and none of them is a copy of a base weight.
    assert not set(weights) & set(base)
    # PiSSA/OLoRA's final adapter is converted to apply to the original base: its rank doubles.
    saved = sum(v.numel() for k, v in weights.items() if "base_layer" not in k)
    assert saved == (2 if case in REWRITES_BASE else 1) * result.summary["trainable_params"]


@pytest.mark.parametrize("case", list(CASES))
def test_saved_weights_load_back_to_identical_outputs(case, tiny_llama_dir, tmp_path):
    method, _ = CASES[case]
    module = METHODS[method["name"]]
    cfg = module.Config(**method)
    kwargs = module.load_kwargs(cfg)

    torch.manual_seed(0)
    model = module.prepare(load_model(str(tiny_llama_dir), **kwargs), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = sample_ids(tiny_llama_dir)
    expected = logits_of(model, ids)
    module.save_trained(model, tmp_path / "saved")

    torch.manual_seed(0)
    again = module.prepare(load_model(str(tiny_llama_dir), **kwargs), cfg)
    module.load_trained(again, tmp_path / "saved")
    torch.testing.assert_close(logits_of(again, ids), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(MERGEABLE))
def test_merged_model_equals_base_plus_adapter(case, tiny_llama_dir, chat_file, tmp_path):
    method, lr = CASES[case]
    result = train_run(tiny_llama_dir, chat_file, tmp_path / "run", method, lr, steps=4)
    ids = sample_ids(tiny_llama_dir)
    out = merge(result.run_dir, tmp_path / "merged")
    merged = load_model(str(out))
    module = METHODS[method["name"]]
    if module.artifact == "model":
        reference = load_model(str(result.run_dir / "model"))
    else:
        from peft import PeftModel

        if module.quantized_base:
            # QLoRA: the adapter was trained on the quantized base; the merge dequantizes it first.
            quantized = load_model(str(tiny_llama_dir), **module.load_kwargs(module.Config(**method)))
            on_quantized = logits_of(PeftModel.from_pretrained(quantized, str(result.run_dir / "adapter")), ids)
            # bitsandbytes' CPU kernels compute in reduced precision, hence the looser bound.
            torch.testing.assert_close(logits_of(merged, ids), on_quantized, rtol=0, atol=1e-2)
            base = load_model(str(tiny_llama_dir), **module.load_kwargs(module.Config(**method))).dequantize().float()
        else:
            base = load_model(str(tiny_llama_dir))
        reference = PeftModel.from_pretrained(base, str(result.run_dir / "adapter"))
    torch.testing.assert_close(logits_of(merged, ids), logits_of(reference, ids), rtol=1e-4, atol=1e-4)
    # and the merge changed the base: a merge that dropped the adapter would equal the untrained model
    assert not torch.allclose(logits_of(merged, ids), logits_of(load_model(str(tiny_llama_dir)), ids), atol=1e-3)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_prompt_learning_cannot_be_merged(tiny_llama_dir, chat_file, tmp_path):
    from slmtune.config import RecipeError

    method, lr = CASES["prompt_tuning"]
    result = train_run(tiny_llama_dir, chat_file, tmp_path / "run", method, lr, steps=1)
    with pytest.raises(RecipeError, match="nothing to merge"):
        load_merged(result.run_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_loftq_on_cpu_is_a_clear_error(tiny_llama_dir, chat_file, tmp_path):
    from slmtune.config import RecipeError

    with pytest.raises(RecipeError, match="loftq needs a CUDA GPU"):
        train_run(tiny_llama_dir, chat_file, tmp_path / "run", {"name": "qlora", "lora_init": "loftq"}, 1e-2, steps=1)
