"""What DPO and ORPO share: preference pairs as training items, their feed, and per-pair log-probabilities.

A pair's two sequences (prompt + preferred answer, prompt + non-preferred answer) go into the same
row, one after the other, so both are scored in one forward pass; each attends only to itself (per-
example attention, or the block-diagonal mask), and the LM head runs on the answers' tokens only.
Rows hold whole pairs (2 x data.max_length tokens); several pairs share a row when rows hold about
two pairs or more (train.packing: auto). A step's loss
is summed over its pairs and divided by their number (units = pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmtune.config import Recipe
from slmtune.data.batching import collate
from slmtune.data.dataset import Datasets
from slmtune.data.formats import preference_parts, preference_tools
from slmtune.data.tokenize import Pair, check_end_of_turn
from slmtune.models import end_of_turn_ids
from slmtune.training.attention import use_per_example_attention
from slmtune.training.feed import Feed, example_feed
from slmtune.training.loss import autocast_dtype, sequence_logprobs
from slmtune.training.objectives.sft import resolve_packing

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


@dataclass
class FedPair:
    """A pair as the feed hands it out, with the reference model's log-probabilities of its two
    answers once they are precomputed."""

    pair: Pair
    reference: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.pair)


def collate_pairs(rows: list[list[FedPair]], pad_id: int, attention: str) -> dict:
    """A micro-batch of pairs: sequences numbered chosen, rejected, chosen, rejected... row by row.
    A row always holds at least a pair's two sequences, so rows are always collated as packed rows
    (each sequence attends only to itself)."""
    batch = collate([[s for fed in row for s in (fed.pair.chosen, fed.pair.rejected)] for row in rows],
                    pad_id, True, attention)
    fed = [f for row in rows for f in row]
    batch["n_units"] = len(fed)
    if all(f.reference is not None for f in fed):
        batch["reference_logprobs"] = torch.tensor([x for f in fed for x in f.reference], dtype=torch.float32)
    return batch


def make_pair_feed(data: Datasets, recipe: Recipe, tokenizer, model, parallel, *, precompute: bool) -> Feed:
    """The feed of pairs; with `precompute`, every pair first gets the reference log-probabilities of
    `model` as it is now (the starting weights)."""
    first = data.train_records[0].data
    prompt, chosen, _ = preference_parts(first)
    check_end_of_turn(prompt + [chosen], tokenizer, end_of_turn_ids(model, tokenizer), preference_tools(first))
    row_length = 2 * recipe.data.max_length
    packed = resolve_packing(recipe, [len(p) for p in data.train], row_length)
    attention = recipe.model.attn_implementation
    if attention == "sdpa":
        use_per_example_attention(model)
    pad_id = tokenizer.pad_token_id
    train, validation = [FedPair(p) for p in data.train], [FedPair(p) for p in data.validation]
    if precompute:
        precompute_reference(model, train + validation, recipe, pad_id)
    return example_feed(train, validation, recipe.train, row_length=row_length, packed=packed, parallel=parallel,
                        collate_rows=lambda rows: collate_pairs(rows, pad_id, attention))


@torch.no_grad()
def precompute_reference(model, items: list[FedPair], recipe: Recipe, pad_id: int, batch_size: int = 8) -> None:
    """Score every pair once with `model` as it is now and keep the two log-probabilities on the pair."""
    device = next(model.parameters()).device
    amp = autocast_dtype(recipe.train.precision, device)
    was_training = model.training
    model.eval()
    for at in range(0, len(items), batch_size):
        chunk = items[at : at + batch_size]
        batch = collate_pairs([[f] for f in chunk], pad_id, recipe.model.attn_implementation)
        sums, _ = sequence_logprobs(model, batch, amp)
        for i, fed in enumerate(chunk):
            fed.reference = (float(sums[2 * i]), float(sums[2 * i + 1]))
    model.train(was_training)


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """The reward metrics of a batch of pairs, summed over pairs (the loop averages them)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {"rewards/chosen": float(chosen_rewards.sum()), "rewards/rejected": float(rejected_rewards.sum()),
            "rewards/margin": float((chosen_rewards - rejected_rewards).sum()),
            "rewards/accuracy": float((chosen_rewards > rejected_rewards).float().sum())}
