"""DoRA: weight-decomposed LoRA (Liu et al., 2024). Each adapted weight is split into a magnitude
vector and a direction; LoRA updates the direction and the magnitude trains directly. Closer to
full fine-tuning quality at low rank, at roughly 1.3-2x LoRA's step time.

    method: {name: dora, lora_r: 8, lora_alpha: 16}
"""

from __future__ import annotations

from typing import Literal

from slmtune.methods import lora
from slmtune.methods.method import Method
from slmtune.methods.peft_common import load_trained, save_trained


class Config(lora.Config):
    name: Literal["dora"] = "dora"


def prepare(model, cfg: Config):
    return lora.wrap(model, cfg, use_dora=True)


METHOD = Method(name="dora", Config=Config, prepare=prepare, save_trained=save_trained, load_trained=load_trained,
                artifact="adapter", summary="LoRA with a trained magnitude per output (weight-decomposed)",
                rewrites_base=lora.rewrites_base, auto_learning_rate=1e-3)
