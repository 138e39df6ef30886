"""Export a run as a standalone Hugging Face model with the adapter merged into the weights.

    slmtune export runs/quickstart --merge exports/lumo-assistant
    slmtune export runs/quickstart --format onnx --output exports/lumo-onnx   # slmtune/export/onnx.py

LoRA/DoRA/IA3 adapters are folded into the base weights (W + scale·B·A). For QLoRA the base is
first dequantized, exactly as training saw it, then merged, so the merged model reproduces the
adapter's outputs rather than those of the unquantized original. Prompt and prefix tuning have
no weights to merge into and are refused with a clear message.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from slmtune.config import RecipeError, load_recipe
from slmtune.methods import METHODS
from slmtune.models import load_model, load_tokenizer


def load_merged(run_dir: str | Path):
    """The run's model with its adapter merged, and its tokenizer (in memory)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError(f"{run_dir}: not a run directory (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    method = METHODS[recipe.method.name]
    artifact = run_dir / method.ARTIFACT
    if not artifact.is_dir():
        raise RecipeError(f"{run_dir}: the run has not finished ({method.ARTIFACT}/ is missing)")
    if method.ARTIFACT == "model":
        return load_model(str(artifact)), load_tokenizer(str(artifact))
    from peft import PeftConfig, PeftModel

    if PeftConfig.from_pretrained(str(artifact)).is_prompt_learning:
        raise RecipeError(f"{recipe.method.name} learns virtual tokens, not weight updates: there is nothing to "
                          "merge; serve the adapter on its base model instead")
    tokenizer = load_tokenizer(recipe.model.name)
    if hasattr(method, "load_kwargs"):
        base = load_model(recipe.model.name, **method.load_kwargs(recipe.method))
        base = base.dequantize().float()
    else:
        base = load_model(recipe.model.name)
    merged = PeftModel.from_pretrained(base, str(artifact)).merge_and_unload()
    return merged, tokenizer


def merge(run_dir: str | Path, out: str | Path) -> Path:
    """Write the merged model to `out` (written to a temp folder, then renamed)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out}: exists and is not empty")
    model, tokenizer = load_merged(run_dir)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
