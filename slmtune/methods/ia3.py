"""IA3: learned vectors that rescale keys, values and the MLP's inner activations (Liu et al., 2022).
Orders of magnitude fewer trainable parameters than LoRA.

    method: {name: ia3}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slmtune.methods.method import Method
from slmtune.methods.peft_common import load_trained, save_trained

# Keys (k), values (v) and the MLP's down projection input, per architecture family;
# PEFT's own table lacks some families (Phi-3's fused qkv_proj cannot scale k and v separately).
TARGETS = {
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
}
DEFAULT_TARGETS = (["k_proj", "v_proj", "down_proj"], ["down_proj"])


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(None, description="Default: keys, values and MLP down projection.")
    feedforward_modules: list[str] | None = Field(None, description="Subset of target_modules scaled on their input.")


def prepare(model, cfg: Config):
    import peft

    targets, feedforward = TARGETS.get(model.config.model_type, DEFAULT_TARGETS)
    config = peft.IA3Config(
        target_modules=cfg.target_modules or targets,
        feedforward_modules=cfg.feedforward_modules if cfg.feedforward_modules is not None else feedforward,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


METHOD = Method(name="ia3", Config=Config, prepare=prepare, save_trained=save_trained, load_trained=load_trained,
                artifact="adapter", summary="learned rescaling vectors of keys, values and MLP activations")
