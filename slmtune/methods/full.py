"""Full fine-tuning: every weight trains (optionally freezing the embeddings and the first layers).

    method: {name: full, freeze_layers: 0, train_embeddings: true}

Memory: weights + gradients + AdamW's two moments, about 16 bytes per parameter in fp32, versus
about 4 for LoRA's frozen base. The run directory gets `model/` (a complete HF model) instead of `adapter/`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slmtune.methods.method import Method

class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["full"] = "full"
    freeze_layers: int = Field(0, ge=0, description="Freeze the first N decoder layers.")
    train_embeddings: bool = Field(True, description="Train the input embeddings (and a tied output head).")


def _layers(model):
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        if hasattr(decoder, name):
            return getattr(decoder, name)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to freeze")


def prepare(model, cfg: Config):
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_layers:
        layers = _layers(model)
        if cfg.freeze_layers > len(layers):
            raise ValueError(f"method.freeze_layers={cfg.freeze_layers} but the model has {len(layers)} layers")
        for layer in layers[: cfg.freeze_layers]:
            layer.requires_grad_(False)
    if not cfg.train_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return model


def save_trained(model, path, final: bool = False, state_dict: dict | None = None) -> None:
    """`state_dict`: the gathered weights when the model's own are sharded (FSDP, ZeRO-3)."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(path, safe_serialization=True, **extra)


def load_trained(model, path) -> None:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output heads are stored once; anything else missing means a wrong checkpoint.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


METHOD = Method(name="full", Config=Config, prepare=prepare, save_trained=save_trained, load_trained=load_trained,
                artifact="model", summary="every weight trains", auto_learning_rate=5e-5)
