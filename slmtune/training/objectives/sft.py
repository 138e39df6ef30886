"""Supervised fine-tuning: next-token cross-entropy on the target tokens of chat, prompt/completion
or text examples (`train.objective: sft`, the default).

Short examples are packed into rows when a row holds about two of them (`train.packing: auto`);
with `model.attn_implementation: sdpa` attention then runs on each packed example alone
(slmtune/training/attention.py). The loss of a step is summed over its target tokens and divided
by their number (units = target tokens).
"""

from __future__ import annotations

from slmtune.config import Recipe, RecipeError
from slmtune.data.batching import collate, should_pack
from slmtune.data.dataset import Datasets
from slmtune.data.tokenize import check_end_of_turn
from slmtune.data.tools import from_legacy, has_tools
from slmtune.methods import METHODS
from slmtune.models import end_of_turn_ids
from slmtune.training.attention import use_per_example_attention
from slmtune.training.feed import Feed, example_feed
from slmtune.training.loss import TargetLoss
from slmtune.training.objectives.objective import Objective


def resolve_packing(recipe: Recipe, lengths: list[int], row_length: int) -> bool:
    cfg, method = recipe.train, METHODS[recipe.method.name]
    packed = should_pack(lengths, row_length) if cfg.packing == "auto" else cfg.packing
    if packed and not method.packing:
        if cfg.packing is True:
            raise RecipeError(f"method {recipe.method.name} cannot train on packed rows; set train.packing: false")
        packed = False
    return packed


def make_feed(data: Datasets, recipe: Recipe, tokenizer, model, parallel) -> Feed:
    if data.format == "chat":
        # The first example, and the first that calls tools (its turns are rendered differently).
        firsts = [data.train_records[0].data] + [r.data for r in data.train_records[:500] if has_tools(r.data)][:1]
        for first in firsts:
            first = from_legacy(first)
            check_end_of_turn(first["messages"], tokenizer, end_of_turn_ids(model, tokenizer), first.get("tools"))
    row_length = recipe.data.max_length
    packed = resolve_packing(recipe, [len(e) for e in data.train], row_length)
    attention = recipe.model.attn_implementation
    if packed and attention == "sdpa":
        use_per_example_attention(model)
    pad_id = tokenizer.pad_token_id

    def collate_rows(rows: list[list]) -> dict:
        batch = collate(rows, pad_id, packed, attention)
        return batch | {"n_units": batch["n_targets"]}

    return example_feed(data.train, data.validation, recipe.train, row_length=row_length, packed=packed,
                        collate_rows=collate_rows, parallel=parallel)


def loss_module(model, recipe: Recipe, feed: Feed) -> TargetLoss:
    return TargetLoss(model, recipe.train.cross_entropy, recipe.train.loss_chunk_tokens)


OBJECTIVE = Objective(name="sft", formats=("chat", "prompt_completion", "text"), make_feed=make_feed,
                      loss_module=loss_module)
