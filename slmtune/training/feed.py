"""What the loop trains on: the micro-batches of every optimizer step, and the validation batches.

    feed = example_feed(examples, validation, cfg, row_length=1024, packed=True, collate_rows=..., parallel=par)
    feed.batches_of_step(12)      # this process's micro-batches of global step 12 (the same after a resume)

Every batch dict carries `n_units` (what its loss is a sum over: target tokens for SFT, pairs for
DPO; a step's loss is divided by the units of the whole global step, so splitting a step into
micro-batches or processes never changes it) and `n_tokens` (for throughput). A rank with no real
micro-batch left gets a copy marked `padding`, which contributes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from slmtune.config import TrainSection
from slmtune.data.batching import example_steps, make_rows, micro_batches, step_micro_batches, steps_per_epoch


@dataclass
class Feed:
    steps_per_epoch: int
    batches_of_step: Callable[[int], list[dict]]
    eval_batches: list[dict]
    micro_batches_per_step: int | None  # fixed count over all ranks (None: as many as a step's examples fill)
    packed: bool
    n_rows: int
    # Validation that is not a loss over fixed batches (GRPO: sample, grade): () -> (eval_loss, metrics).
    evaluate: Callable[[], tuple[float, dict]] | None = None
    # train.select_by: metric: () -> the task's metrics of greedy answers to the validation rows
    # (slmtune.scoring), and which of them picks the best evaluation.
    score_task: Callable[[], dict] | None = None
    selection_metric: str | None = None

    @property
    def has_validation(self) -> bool:
        return bool(self.eval_batches) or self.evaluate is not None


def example_feed(items: Sequence, eval_items: Sequence, cfg: TrainSection, *, row_length: int, packed: bool,
                 collate_rows: Callable[[list[list]], dict], parallel) -> Feed:
    """The feed over examples (or pairs) with a length: packed into rows of `row_length` tokens (or
    one per row), shuffled per epoch with a generator seeded by (seed, epoch), cut into steps of
    micro_batch_size x gradient_accumulation_steps x processes rows, or of exactly
    `examples_per_step` examples (packed into as few rows as fit)."""
    par = parallel
    lengths = [len(e) for e in items]
    rows = make_rows(items, row_length, packed)
    if not cfg.examples_per_step:
        per_step = cfg.gradient_accumulation_steps * par.world_size  # micro-batches per optimizer step, all ranks
        per_epoch = steps_per_epoch(len(rows), cfg.micro_batch_size, per_step)
    else:
        per_epoch = math.ceil(len(items) / cfg.examples_per_step)
        per_step = None  # however many micro-batches the step's examples fill

    def batches_of_step(step: int) -> list[dict]:
        """This rank's micro-batches of global step `step` (all of them in one process)."""
        epoch, index = divmod(step, per_epoch)
        if cfg.examples_per_step:
            examples = example_steps(len(items), cfg.examples_per_step, cfg.seed, epoch)[index]
            chosen = step_micro_batches(examples, lengths, row_length, packed, cfg.micro_batch_size)
        else:
            epoch_batches = micro_batches(rows, cfg.micro_batch_size, cfg.seed, epoch)
            chosen = epoch_batches[index * per_step : (index + 1) * per_step]
        return [collate_rows([[items[i] for i in row] for row in mb]) | ({} if real else {"padding": True})
                for mb, real in par.share(chosen)]

    eval_rows = make_rows(eval_items, row_length, packed)
    eval_batches = [collate_rows([[eval_items[i] for i in row] for row in eval_rows[at : at + cfg.micro_batch_size]])
                    for at in range(0, len(eval_rows), cfg.micro_batch_size)]
    return Feed(per_epoch, batches_of_step, eval_batches, per_step, packed, len(rows))
