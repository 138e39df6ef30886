"""`Method`: what a method module provides to the pipeline (see slmtune/methods/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel


def _no_load_kwargs(cfg) -> dict:
    return {}


def _keeps_base(cfg) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    name: str
    Config: type[BaseModel]  # the recipe's `method` section for this method (a `name` literal discriminates)
    prepare: Callable[[Any, Any], Any]  # (model, cfg) -> the model to train
    save_trained: Callable[..., None]  # (model, path, final=False, state_dict=None): checkpoints and the result
    load_trained: Callable[[Any, Any], None]  # (prepared model, path): weights of save_trained(final=False)
    artifact: Literal["adapter", "model"]  # the run directory's folder holding the result
    summary: str  # one line for listings (the console's wizard, `slmtune plan`)
    load_kwargs: Callable[[Any], dict] = _no_load_kwargs  # extra from_pretrained arguments (quantization)
    quantized_base: bool = False  # the frozen base is loaded quantized (merging dequantizes it first)
    packing: bool = True  # False: virtual tokens change the sequence layout, rows stay unpacked
    rewrites_base: Callable[[Any], bool] = _keeps_base  # cfg -> initialisation moves weights out of the base
    auto_learning_rate: float = 2e-4  # the learning rate "auto" picks (the service's base rate)
