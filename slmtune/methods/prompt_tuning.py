"""Prompt tuning: learn `num_virtual_tokens` input embeddings prepended to every example, the
model itself frozen (Lester et al., 2021). Tens of thousands of trainable parameters.

    method: {name: prompt_tuning, num_virtual_tokens: 20, init_text: "Answer as the Lumo support assistant."}

Virtual tokens change the sequence layout, so packing is off for this method.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slmtune.methods.method import Method
from slmtune.methods.peft_common import load_trained, save_trained

class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = Field(None, description="Initialise the virtual tokens from this text's embeddings.")


def prepare(model, cfg: Config):
    import peft

    kwargs = {"prompt_tuning_init": "RANDOM"}
    if cfg.init_text:
        kwargs = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": cfg.init_text,
                  "tokenizer_name_or_path": model.config.name_or_path}
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens, **kwargs)
    return peft.get_peft_model(model, config)


METHOD = Method(name="prompt_tuning", Config=Config, prepare=prepare, save_trained=save_trained,
                load_trained=load_trained, artifact="adapter", summary="learned virtual input tokens",
                packing=False)
