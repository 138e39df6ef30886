"""The training loop: AdamW, warmup + schedule, gradient accumulation, clipping, checkpoints.

Read it top to bottom in `train()`. The loss of one optimizer step is the sum of token losses over
every micro-batch it accumulates, divided by the number of target tokens in all of them, so 4
micro-batches of 2 rows give exactly the loss and gradients of 1 micro-batch of 8 rows. With
several processes (train.distributed, slmtune/training/distributed.py) a step takes world_size times as many
micro-batches, each rank every world_size-th of them, with the same loss and updates as one process.
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from slmtune.config import TrainSection
from slmtune.data.batching import collate, example_steps, micro_batches, step_micro_batches, steps_per_epoch
from slmtune.data.tokenize import Example
from slmtune.methods import Method
from slmtune.training import events
from slmtune.training.distributed import SingleProcess
from slmtune.training.loss import TargetLoss, autocast_dtype, target_loss_sum
from slmtune.training.rundir import CHECKPOINT_STATE, RunDir

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accumulate_gradients(model, batches: list[dict], amp_dtype: torch.dtype | None, *,
                         step_targets: int | None = None, parallel=None) -> float:
    """Backward over the micro-batches of one optimizer step; returns the step's mean token loss.

    Each micro-batch's summed loss is divided by the target tokens of *all* of them, so the
    gradients equal those of one big batch however the step is split. In a data-parallel run
    `batches` are this rank's share, `step_targets` counts the targets of the whole global step,
    `parallel` runs each pass through the wrapped model, and the result is this rank's part of the
    loss (the caller sums it over ranks).
    """
    if step_targets is None:
        step_targets = sum(b["n_targets"] for b in batches)
    step_targets = max(step_targets, 1)
    total = 0.0
    for i, batch in enumerate(batches):
        if parallel is not None:
            total += parallel.forward_backward(batch, amp_dtype, step_targets, last=i == len(batches) - 1)
            continue
        loss = target_loss_sum(model, batch, amp_dtype) / step_targets
        loss.backward()
        total += loss.item()
    return total


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups, weight decay on matrices only; the same order under every strategy, so
    optimizer states are indexed alike in every checkpoint."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_loss(model, batches: list[dict], amp_dtype, parallel=None) -> float | None:
    """Mean token loss over `batches`; in a data-parallel run each rank evaluates its share."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch, real in (parallel.share(batches) if parallel else [(b, True) for b in batches]):
        loss = parallel.loss(batch, amp_dtype) if parallel else target_loss_sum(model, batch, amp_dtype)
        if real:
            total += loss.item()
            count += batch["n_targets"]
    if parallel is not None:
        total, count = parallel.all_sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


def make_scheduler(optimizer, cfg: TrainSection, total_steps: int):
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if cfg.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    train_tokens: int = 0  # non-padding tokens processed
    target_tokens: int = 0
    train_seconds: float = 0.0
    last_loss: float | None = None
    last_eval_loss: float | None = None
    state_bytes_per_rank: list | None = None  # parameter/gradient/optimizer bytes held by each process
    micro_batches_per_step: int | None = None  # gradient_accumulation_steps x processes


def write_trained(method, model, path: Path, weights: dict | None, final: bool = False) -> None:
    """method.save_trained, from `weights` (gathered full weights) when the model's own are sharded."""
    if weights is None:
        method.save_trained(model, path, final=final)
    else:
        method.save_trained(model, path, final=final, state_dict=weights)


def save_checkpoint(run_dir: RunDir, method: Method, model, parallel, scheduler, state: TrainState, keep: int,
                    protect: int | None = None) -> Path | None:
    """Write checkpoints/step-N (weights, optimizer, scheduler, RNG, loop state) and prune old ones.

    Always the one-process format (full trainable weights and optimizer states), so any number of
    processes can resume it. In a data-parallel run every rank gathers, rank 0 writes (others get None)."""
    weights = parallel.trained_state_dict(model, trainable_only=method.artifact == "adapter")
    optimizer_state = parallel.optimizer_state_dict(state.step)
    if not parallel.is_main:
        return None
    with run_dir.writing_checkpoint(state.step, keep, protect) as tmp:
        write_trained(method, model, tmp / method.artifact, weights)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state.__dict__, indent=2) + "\n")
    return run_dir.checkpoint(state.step)


def checkpoint_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / CHECKPOINT_STATE).read_text()))


def load_checkpoint(path: Path, parallel, scheduler) -> TrainState:
    """Optimizer, scheduler, RNG and loop state of a checkpoint; its weights went into the model
    before it was wrapped (see train())."""
    parallel.load_optimizer_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return checkpoint_state(path)


class StopRequested:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step boundary; a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort)...",
                  file=sys.stderr, flush=True)

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def train(
    model,
    method,
    train_examples: list[Example],
    train_rows: list[list[int]],
    eval_batches: list[dict],
    cfg: TrainSection,
    *,
    run_dir: RunDir,
    pad_id: int,
    packed: bool,
    attn_implementation: str,
    max_length: int | None = None,
    resume_from: Path | None = None,
    emit: events.EventSink = lambda event: None,
    progress: bool = True,
    parallel: SingleProcess | None = None,
) -> TrainState:
    """Train `model` in place. Returns the final state; the caller saves the result.

    `parallel` (slmtune.training.distributed.start) is this process's part of a data-parallel run; the
    default is one process. Every rank calls train(); `emit` and `progress` matter on rank 0 only."""
    par = parallel or SingleProcess()
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(cfg.precision, device)
    if not cfg.examples_per_step:
        per_step = cfg.gradient_accumulation_steps * par.world_size  # micro-batches per optimizer step, all ranks
        per_epoch = steps_per_epoch(len(train_rows), cfg.micro_batch_size, per_step)
    else:
        if max_length is None:
            raise ValueError("train.examples_per_step needs the row length (max_length)")
        per_epoch = math.ceil(len(train_examples) / cfg.examples_per_step)
        per_step = None  # however many micro-batches the step's examples fill
        lengths = [len(e) for e in train_examples]
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))

    if resume_from is not None:  # full weights, loaded before any sharding
        method.load_trained(model, resume_from / method.artifact)
    # The loss module carries the cross-entropy settings: every training and evaluation pass goes through `par`.
    optimizer = par.setup(TargetLoss(model, cfg.cross_entropy, cfg.loss_chunk_tokens),
                          lambda module: optimizer_groups(module, cfg.weight_decay),
                          lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    scheduler = make_scheduler(optimizer, cfg, total_steps)

    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, par, scheduler)
        if per_step is not None and state.micro_batches_per_step not in (None, per_step):
            note = (f"the checkpoint's steps took {state.micro_batches_per_step} micro-batches, this run's take "
                    f"{per_step} (gradient_accumulation_steps x processes); to continue exactly as before, set "
                    f"train.gradient_accumulation_steps={state.micro_batches_per_step / par.world_size:g}")
            emit(events.Notice(note))
            if par.is_main:
                print(f"warning: {note}", file=sys.stderr, flush=True)
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    state.micro_batches_per_step = per_step
    emit(events.Start(total_steps=total_steps, steps_per_epoch=per_epoch, resumed_at=state.step,
                      precision="bf16" if amp_dtype else "fp32", packed=packed, threads=torch.get_num_threads(),
                      strategy=par.strategy, world_size=par.world_size))

    def batches_of_step(step: int) -> list[dict]:
        """This rank's micro-batches of global step `step` (all of them in one process)."""
        epoch, index = divmod(step, per_epoch)
        if cfg.examples_per_step:
            examples = example_steps(len(train_examples), cfg.examples_per_step, cfg.seed, epoch)[index]
            chosen = step_micro_batches(examples, lengths, max_length, packed, cfg.micro_batch_size)
        else:
            epoch_batches = micro_batches(train_rows, cfg.micro_batch_size, cfg.seed, epoch)
            chosen = epoch_batches[index * per_step : (index + 1) * per_step]
        return [collate([[train_examples[i] for i in row] for row in mb], pad_id, packed, attn_implementation)
                | ({} if real else {"padding": True}) for mb, real in par.share(chosen)]

    model.train()
    bar = None
    if progress:
        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    measured = False
    with StopRequested() as stop:
        while state.step < total_steps:
            started = time.perf_counter()
            batches = batches_of_step(state.step)
            real = [b for b in batches if not b.get("padding")]
            # Targets and tokens of the whole global step: every rank normalizes by the same count.
            step_targets, step_tokens = (int(n) for n in par.all_sum(
                [sum(b["n_targets"] for b in real), sum(b["n_tokens"] for b in real)]))
            loss_total = accumulate_gradients(model, batches, amp_dtype, step_targets=step_targets, parallel=par)
            loss_total, stop_votes = par.all_sum([loss_total, float(stop.requested)])
            stop_requested = stop_votes > 0  # all ranks stop at the same step
            lr = scheduler.get_last_lr()[0]
            grad_norm = par.optimizer_step(cfg.max_grad_norm)
            scheduler.step()
            if not measured:  # parameter+gradient+optimizer bytes of each rank, at its first step
                state.state_bytes_per_rank, measured = par.state_bytes_per_rank(), True
                emit(events.Memory(step=state.step + 1, state_bytes_per_rank=state.state_bytes_per_rank))

            elapsed = time.perf_counter() - started
            state.step += 1
            state.train_tokens += step_tokens
            state.target_tokens += step_targets
            state.train_seconds += elapsed
            state.last_loss = loss_total
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                emit(events.Step(step=state.step, epoch=round(state.step / per_epoch, 4), loss=round(loss_total, 6),
                                 lr=lr, grad_norm=round(grad_norm, 6), tokens=state.train_tokens,
                                 tokens_per_second=round(step_tokens / elapsed, 1), total_steps=total_steps))
            if bar is not None:
                bar.set_postfix(loss=f"{loss_total:.4f}", tok_s=f"{state.train_tokens / state.train_seconds:.0f}")
                bar.update(1)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps and eval_batches:
                state.last_eval_loss = evaluate_loss(model, eval_batches, amp_dtype, parallel=par)
                emit(events.Eval(step=state.step, eval_loss=round(state.last_eval_loss, 6)))
            should_save = cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps
            if should_save or (stop_requested and state.step < total_steps):
                path = save_checkpoint(run_dir, method, model, par, scheduler, state, cfg.keep_checkpoints)
                emit(events.Checkpoint(step=state.step, path=str(path)))
            if stop_requested and state.step < total_steps:
                if bar is not None:
                    bar.close()
                raise TrainingStopped(state.step, run_dir)
    if bar is not None:
        bar.close()
    if eval_batches:
        state.last_eval_loss = evaluate_loss(model, eval_batches, amp_dtype, parallel=par)
        emit(events.Eval(step=state.step, eval_loss=round(state.last_eval_loss, 6)))
    return state


class TrainingStopped(Exception):
    """Training was asked to stop (SIGINT/SIGTERM); a checkpoint at `step` allows --resume."""

    def __init__(self, step: int, run_dir: RunDir | None = None):
        super().__init__(f"stopped at step {step}; a checkpoint was saved")
        self.step, self.run_dir = step, run_dir
