"""Rows and micro-batches: packing short examples together, and collating rows into tensors.

A packed row holds several examples back to back. Each keeps its own position ids (restarting
at 0) and attends only to itself through an explicit 4D block-diagonal causal mask: sdpa and
eager attention honour such a mask, while position ids alone would let attention leak across
examples. The batch also lists each row's example spans (`packed_examples`), so attention can run
on each example alone (slmtune.models.per_example_sdpa) instead of masking a whole row. Unpacked
rows use an ordinary 2D padding mask.
"""

from __future__ import annotations

import bisect
import math

import torch

from slmtune.data.tokenize import IGNORE, Example


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of example lengths into rows of at most max_length tokens.
    Returns lists of example indices. O(n log n): free space is kept sorted."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), ascending
    for i in order:
        need = min(lengths[i], max_length)
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            space -= need
        else:
            rows.append([i])
            row, space = len(rows) - 1, max_length - need
        if space > 0:
            bisect.insort(free, (space, row))
    return rows


def should_pack(lengths: list[int], max_length: int) -> bool:
    """Packing pays off when a row can hold about two or more examples."""
    return bool(lengths) and sum(lengths) / len(lengths) <= max_length / 2


def make_rows(examples: list[Example], max_length: int, packing: bool) -> list[list[int]]:
    if packing:
        return pack_rows([len(e) for e in examples], max_length)
    return [[i] for i in range(len(examples))]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) seeded by (seed, epoch): the same on a resumed run."""
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def micro_batches(rows: list[list[int]], micro_batch_size: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """The epoch's micro-batches: rows shuffled with a generator seeded by (seed, epoch), so a resumed
    run sees exactly the order an uninterrupted run would."""
    shuffled = [rows[i] for i in epoch_order(len(rows), seed, epoch)]
    return [shuffled[i : i + micro_batch_size] for i in range(0, len(shuffled), micro_batch_size)]


def example_steps(n_examples: int, examples_per_step: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's optimizer steps as lists of example indices, `examples_per_step` each (the last
    may be short), in an order seeded by (seed, epoch) like micro_batches."""
    order = epoch_order(n_examples, seed, epoch)
    return [order[i : i + examples_per_step] for i in range(0, n_examples, examples_per_step)]


def step_micro_batches(examples: list[int], lengths: list[int], max_length: int, packing: bool,
                       micro_batch_size: int) -> list[list[list[int]]]:
    """One step's examples packed into rows (or one per row) and cut into micro-batches."""
    if packing:
        rows = [[examples[j] for j in row] for row in pack_rows([lengths[i] for i in examples], max_length)]
    else:
        rows = [[i] for i in examples]
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def steps_per_epoch(n_rows: int, micro_batch_size: int, gradient_accumulation_steps: int) -> int:
    return math.ceil(math.ceil(n_rows / micro_batch_size) / gradient_accumulation_steps)


def collate(rows: list[list[Example]], pad_id: int, packed: bool, attn_implementation: str = "sdpa") -> dict:
    """Tensors for one micro-batch of rows; each row is a list of examples."""
    width = max(sum(len(e) for e in row) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    targets = torch.full((batch, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.full((batch, width), -1, dtype=torch.long)
    sequence_ids = torch.full((batch, width), -1, dtype=torch.long)
    spans: list[list[tuple[int, int]]] = [[] for _ in rows]
    n_sequences = 0
    for b, row in enumerate(rows):
        at = 0
        for s, example in enumerate(row):
            n = len(example)
            input_ids[b, at : at + n] = torch.tensor(example.input_ids)
            targets[b, at : at + n] = torch.tensor(example.targets)
            position_ids[b, at : at + n] = torch.arange(n)
            segment[b, at : at + n] = s
            sequence_ids[b, at : at + n] = n_sequences
            spans[b].append((at, n))
            at += n
            n_sequences += 1
    real = segment >= 0
    # sequence_ids numbers the examples of the batch row by row: objectives that score whole
    # sequences (preference pairs) sum their tokens' log-probabilities by it.
    out = {"input_ids": input_ids, "targets": targets, "position_ids": position_ids, "sequence_ids": sequence_ids,
           "n_sequences": n_sequences, "n_tokens": int(real.sum()), "n_targets": int((targets != IGNORE).sum())}
    if not packed:
        out["attention_mask"] = real.long()
        return out
    # Per-example attention (slmtune.models.per_example_sdpa) reads the spans; sdpa and eager the mask.
    out["packed_examples"] = spans
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & real[:, None, :] & causal
    # Padding queries attend to themselves so no softmax row is empty (an empty row gives NaN).
    allowed |= torch.eye(width, dtype=torch.bool) & ~real[:, :, None]
    mask = allowed[:, None, :, :]
    if attn_implementation == "eager":
        # Eager attention adds the mask to the scores, so it needs 0 / -inf-like floats.
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
    out["attention_mask"] = mask
    return out
