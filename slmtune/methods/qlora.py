"""QLoRA: LoRA adapters over a base model quantized with bitsandbytes (Dettmers et al., 2023).

    method: {name: qlora, quant_bits: 4, quant_type: nf4, double_quant: true, lora_r: 16}

4-bit NF4 (or FP4) with double quantization of the scales, or 8-bit (LLM.int8). The frozen base
takes ~4x (4-bit) or ~2x (8-bit) less memory than bf16; compute happens in `compute_dtype`.
bitsandbytes runs this on CUDA and, since 0.4x, on CPU. `lora_init: loftq` initialises the
adapters to cancel part of the quantization error (LoftQ, Li et al., 2023), leaving the base as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from slmtune.methods import lora
from slmtune.methods.method import Method
from slmtune.methods.peft_common import load_trained, save_trained


class Config(lora.Config):
    name: Literal["qlora"] = "qlora"
    quant_bits: Literal[4, 8] = Field(4, description="Bits per frozen base weight.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization scales too (saves ~0.4 bit/weight).")
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    lora_init: Literal["default", "gaussian", "loftq"] = "default"


def quantization_config(cfg: Config):
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
    )


def load_kwargs(cfg: Config) -> dict:
    """Extra from_pretrained arguments: the base is quantized while it loads."""
    return {"quantization_config": quantization_config(cfg)}


def prepare(model, cfg: Config):
    import peft

    # Casts norms to fp32 and makes inputs require grad; gradient checkpointing stays the
    # recipe's choice (train.gradient_checkpointing), not PEFT's default.
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    import torch

    weights_file = Path(model.config.name_or_path) / "model.safetensors"
    if cfg.lora_init == "loftq" and not torch.cuda.is_available():
        raise ValueError("lora_init: loftq needs a CUDA GPU (PEFT's LoftQ replacement runs on CUDA only)")
    plain = cfg.model_copy(update={"lora_init": "default" if cfg.lora_init == "loftq" else cfg.lora_init})
    model = lora.wrap(model, plain)
    if cfg.lora_init == "loftq":
        from peft import replace_lora_weights_loftq

        # LoftQ needs the unquantized weights, read from the local single-file checkpoint.
        if not weights_file.is_file():
            raise ValueError(f"lora_init: loftq needs a local model with one model.safetensors file; {weights_file} is missing")
        replace_lora_weights_loftq(model, model_path=str(weights_file))
    return model


METHOD = Method(name="qlora", Config=Config, prepare=prepare, save_trained=save_trained, load_trained=load_trained,
                artifact="adapter", summary="LoRA over a 4-bit (or 8-bit) quantized frozen base",
                load_kwargs=load_kwargs, quantized_base=True, auto_learning_rate=1e-3)
