"""LoRA: train low-rank updates B·A beside frozen linear layers (Hu et al., 2021).

    method: {name: lora, lora_r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: all-linear}

Options from the PEFT family: `use_rslora` (scale alpha/sqrt(r), Kalajdzievski 2023, steadier at
high rank) and `lora_init: pissa|olora` (start from the principal singular vectors / an
orthonormal basis of the weights; the final adapter is converted to apply to the original model).
`target_modules: all-linear` adapts every linear layer except the output head: the Llama, Mistral,
Qwen2 and Gemma projections and Phi-3's fused `qkv_proj`/`gate_up_proj` alike.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slmtune.methods.method import Method
from slmtune.methods.peft_common import load_trained, remember_initial_adapter, save_trained


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["lora"] = "lora"
    lora_r: int = Field(16, ge=1, description="Rank of the update B·A.")
    lora_alpha: float = Field(32, gt=0, description="Scale: the update is multiplied by lora_alpha / lora_r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input; 0 saves memory.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling lora_alpha / sqrt(lora_r).")
    lora_init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="Adapter initialisation; default starts B at zero."
    )


def peft_config(cfg, **extra):
    import peft

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[cfg.lora_init]
    return peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        init_lora_weights=init,
        task_type="CAUSAL_LM",
        **extra,
    )


def wrap(model, cfg, **extra):
    """Freeze `model` and add fresh LoRA adapters; returns a peft.PeftModel."""
    import peft

    model = peft.get_peft_model(model, peft_config(cfg, **extra))
    if cfg.lora_init in ("pissa", "olora"):
        remember_initial_adapter(model)
    return model


def prepare(model, cfg: Config):
    return wrap(model, cfg)


def rewrites_base(cfg: Config) -> bool:
    """PiSSA/OLoRA move the top singular directions of each weight into the adapter."""
    return cfg.lora_init in ("pissa", "olora")


METHOD = Method(name="lora", Config=Config, prepare=prepare, save_trained=save_trained, load_trained=load_trained,
                artifact="adapter", summary="low-rank adapters beside frozen weights", rewrites_base=rewrites_base,
                auto_learning_rate=1e-3)
