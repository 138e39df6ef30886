"""`Objective`: what an objective module provides to run() and the loop (see objectives/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from slmtune.training.feed import Feed
from slmtune.training.loss import ObjectiveLoss


@dataclass(frozen=True)
class Objective:
    name: str
    formats: tuple[str, ...]  # the training data formats it learns from (slmtune/data/formats.py)
    make_feed: Callable[..., Feed]  # (data, recipe, tokenizer, model, parallel) -> Feed
    loss_module: Callable[..., ObjectiveLoss]  # (model, recipe, feed) -> the module the loop wraps
    progress_metrics: tuple[str, ...] = ()  # shown beside the loss in the progress bar
