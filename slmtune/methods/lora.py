"""LoRA: train low-rank adapters B·A beside frozen linear layers (Hu et al., 2021).

    method: {name: lora, lora_r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: all-linear}

`target_modules: all-linear` adapts every linear layer except the output head, which covers
Llama/Mistral/Qwen2/Gemma projections and Phi-3's fused `qkv_proj`/`gate_up_proj` alike.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["lora"] = "lora"
    lora_r: int = Field(16, ge=1, description="Rank of the update B·A.")
    lora_alpha: float = Field(32, gt=0, description="Scale: the update is multiplied by lora_alpha / lora_r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )


def prepare(model, cfg: Config):
    """Freeze `model` and wrap it with fresh LoRA adapters; returns a peft.PeftModel."""
    import peft

    peft_config = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, peft_config)


def save_trained(model, path) -> None:
    """Write the adapter in PEFT format (loadable with PeftModel.from_pretrained)."""
    model.save_pretrained(path)


def load_trained(model, path) -> None:
    """Load adapter weights saved by save_trained into an already prepared model."""
    from peft import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(str(path)))
