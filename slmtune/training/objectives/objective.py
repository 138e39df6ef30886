"""`Objective`: what an objective module provides to run() and the loop (see objectives/__init__.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from slmtune.config import Recipe
from slmtune.methods import METHODS
from slmtune.methods.peft_common import unwrap
from slmtune.training.feed import Feed
from slmtune.training.loss import ObjectiveLoss


@dataclass(frozen=True)
class Objective:
    name: str
    formats: tuple[str, ...]  # the training data formats it learns from (slmtune/data/formats.py)
    make_feed: Callable[..., Feed]  # (data, recipe, tokenizer, model, parallel) -> Feed
    loss_module: Callable[..., ObjectiveLoss]  # (model, recipe, feed) -> the module the loop wraps
    progress_metrics: tuple[str, ...] = ()  # shown beside the loss in the progress bar


# --- the reference model of objectives that compare the policy with its start (DPO, GRPO's KL) -----
def frozen_reference(model, recipe: Recipe):
    """A frozen copy of the starting weights (the whole model for full fine-tuning, else the model
    with its starting adapter), kept out of the optimizer by the caller."""
    full = METHODS[recipe.method.name].artifact == "model"
    reference = copy.deepcopy(unwrap(model) if full else model)
    return reference.requires_grad_(False).eval()


@torch.no_grad()
def reference_scores(mode: str, model, reference_model, score: Callable):
    """`score(m)` under the reference: `model` with its adapter disabled ("adapter_disabled", no
    second copy of the weights) or the frozen `reference_model`."""
    if mode == "adapter_disabled":
        with model.disable_adapter():
            return score(model)
    return score(reference_model)
