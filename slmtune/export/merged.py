"""Export a run as a standalone Hugging Face model with the adapter merged into the weights.

    slmtune export runs/quickstart --merge exports/lumo-assistant
    slmtune export runs/quickstart --format onnx --output exports/lumo-onnx   # slmtune/export/onnx.py

LoRA/DoRA/IA3 adapters are folded into the base weights (W + scale·B·A); what "merged" means per
method (QLoRA's dequantized base, prompt tuning refused) is `slmtune.training.rundir.load_merged`.
"""

from __future__ import annotations

import os
from pathlib import Path

from slmtune import atomic
from slmtune.config import RecipeError
from slmtune.training.rundir import load_merged


def merge(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the run's merged model and tokenizer to `out` (a temp folder renamed at the end)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out}: exists and is not empty")
    model, tokenizer = load_merged(run_dir)
    if hasattr(model.config, "quantization_config"):  # a dequantized QLoRA base keeps the attribute
        del model.config.quantization_config
    with atomic.directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
