"""Prefix tuning: learn `num_virtual_tokens` key/value pairs per layer that every token attends
to, the model itself frozen (Li & Liang, 2021).

    method: {name: prefix_tuning, num_virtual_tokens: 20}

Prefixes enter as a KV cache, so packing is off for this method.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slmtune.methods.method import Method
from slmtune.methods.peft_common import load_trained, save_trained

class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, ge=1)


def prepare(model, cfg: Config):
    import peft

    return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens))


METHOD = Method(name="prefix_tuning", Config=Config, prepare=prepare, save_trained=save_trained,
                load_trained=load_trained, artifact="adapter", summary="learned key/value prefixes in every layer",
                packing=False)
