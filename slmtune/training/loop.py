"""The training loop: AdamW, warmup + schedule, gradient accumulation, clipping, checkpoints.

Read it top to bottom in `train()`. It is the same for every objective (slmtune/training/objectives/):
the objective's feed gives the micro-batches of each step, its loss module the loss summed over
each batch's units (target tokens, pairs...). The loss of one optimizer step is that sum over every
micro-batch it accumulates, divided by the units in all of them, so 4 micro-batches of 2 rows give
exactly the loss and gradients of 1 micro-batch of 8 rows. With
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

from slmtune import auto
from slmtune.config import TrainSection
from slmtune.methods import Method
from slmtune.training import events
from slmtune.training.distributed import SingleProcess
from slmtune.training.feed import Feed
from slmtune.training.loss import ObjectiveLoss, autocast_dtype, target_loss_sum
from slmtune.training.neftune import noisy_embeddings
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


def accumulate_step(par: SingleProcess, loss: ObjectiveLoss, batches: list[dict], amp_dtype,
                    step_units: int) -> tuple[float, dict[str, float]]:
    """Backward over this rank's micro-batches of one step, each loss divided by the units of the
    whole global step; returns this rank's part of the step loss and its summed metrics."""
    total, metric_sums = 0.0, dict.fromkeys(loss.metric_names, 0.0)
    for i, batch in enumerate(batches):
        total += par.forward_backward(batch, amp_dtype, max(step_units, 1), last=i == len(batches) - 1)
        if not batch.get("padding"):
            for k in loss.metric_names:
                metric_sums[k] += loss.metric_sums.get(k, 0.0)
    return total, metric_sums


@torch.no_grad()
def evaluate(par: SingleProcess, loss: ObjectiveLoss, batches: list[dict], amp_dtype) -> tuple[float | None, dict]:
    """Mean loss per unit over `batches` and the objective's metrics; in a data-parallel run each
    rank evaluates its share."""
    if not batches:
        return None, {}
    model = loss.model
    was_training = model.training
    model.eval()
    totals = [0.0, 0.0] + [0.0] * len(loss.metric_names)
    for batch, real in par.share(batches):
        value = par.loss(batch, amp_dtype)
        if real:
            totals[0] += value.item()
            totals[1] += batch["n_units"]
            for i, k in enumerate(loss.metric_names):
                totals[2 + i] += loss.metric_sums.get(k, 0.0)
    totals = par.all_sum(totals)
    model.train(was_training)
    units = max(totals[1], 1)
    return totals[0] / units, {k: round(v / units, 6) for k, v in zip(loss.metric_names, totals[2:])}


def make_scheduler(optimizer, cfg: TrainSection, total_steps: int, last_step: int = 0):
    """Warmup then the schedule over `total_steps`; `last_step` > 0 re-plans a running schedule (a time
    budget) so that its next step is `last_step + 1` of the new plan."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    last_epoch = last_step - 1 if last_step else -1  # LambdaLR steps once on creation
    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps, last_epoch=last_epoch)
    if cfg.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps, last_epoch=last_epoch)
    return get_constant_schedule_with_warmup(optimizer, warmup, last_epoch=last_epoch)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    train_tokens: int = 0  # non-padding tokens processed
    target_tokens: int = 0
    train_seconds: float = 0.0
    last_loss: float | None = None
    last_eval_loss: float | None = None
    last_eval_metrics: dict | None = None
    state_bytes_per_rank: list | None = None  # parameter/gradient/optimizer bytes held by each process
    micro_batches_per_step: int | None = None  # gradient_accumulation_steps x processes
    planned_steps: int | None = None  # the step count the schedule is planned for
    last_eval_step: int | None = None
    best_step: int | None = None  # the step of the lowest validation loss so far
    best_eval_loss: float | None = None  # the validation loss of best_step
    best_value: float | None = None  # what selected best_step: its loss, or its task metric (select_by: metric)
    selected_by: str | None = None  # "eval_loss" or "task/<metric>": what best_value is
    best_eval_metrics: dict | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    loop_seconds: float = 0.0  # wall time of the loop in this process: steps, evaluations, checkpoints


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
    fields = json.loads((path / CHECKPOINT_STATE).read_text())
    fields.setdefault("best_value", fields.get("best_eval_loss"))  # a checkpoint from before select_by
    return TrainState(**fields)


def load_checkpoint(path: Path, parallel, scheduler) -> TrainState:
    """Optimizer, scheduler, RNG and loop state of a checkpoint; its weights went into the model
    before it was wrapped (see train())."""
    parallel.load_optimizer_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
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
    method: Method,
    feed: Feed,
    loss: ObjectiveLoss,
    cfg: TrainSection,
    *,
    run_dir: RunDir,
    resume_from: Path | None = None,
    emit: events.EventSink = lambda event: None,
    progress: bool = True,
    progress_metrics: tuple[str, ...] = (),
    parallel: SingleProcess | None = None,
) -> TrainState:
    """Train `model` in place on `feed`, minimizing `loss` (a module around `model`, the one that
    distributed strategies wrap). Returns the final state; the caller saves the result.

    `parallel` (slmtune.training.distributed.start) is this process's part of a data-parallel run; the
    default is one process. Every rank calls train(); `emit` and `progress` matter on rank 0 only."""
    par = parallel or SingleProcess()
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(cfg.precision, device)
    per_epoch, per_step = feed.steps_per_epoch, feed.micro_batches_per_step
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    budget = TimeBudget(cfg.time_budget_seconds) if cfg.time_budget_seconds else None
    if budget is not None:
        # A provisional plan until the first steps are timed; a resumed run keeps its plan.
        planned = checkpoint_state(resume_from).planned_steps if resume_from is not None else None
        if planned:
            total_steps, budget.planned, budget.replanned = planned, True, True
        else:
            total_steps = max(total_steps, TimeBudget.CALIBRATION_STEPS + 1)
    eval_every = auto.eval_every(total_steps) if cfg.eval_every == "auto" else cfg.eval_every

    if resume_from is not None:  # full weights, loaded before any sharding
        method.load_trained(model, resume_from / method.artifact)
    optimizer = par.setup(loss, lambda module: optimizer_groups(module, cfg.weight_decay),
                          lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    scheduler = make_scheduler(optimizer, cfg, total_steps)

    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, par, scheduler)
        selecting = "eval_loss" if cfg.select_by == "loss" else f"task/{feed.selection_metric}"
        if state.best_step is not None and state.selected_by not in (None, selecting) or \
                state.selected_by is None and cfg.select_by != "loss":
            # A loss and a task metric do not compare: the best is chosen again from the next evaluation.
            emit(events.Notice(f"the checkpoint chose its best evaluation by {state.selected_by or 'eval_loss'}, this "
                               f"run by {selecting}: the best is chosen again from the next evaluation"))
            state.best_step = state.best_value = state.best_eval_loss = state.best_eval_metrics = None
            state.evals_since_best = 0
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
    state.planned_steps = total_steps
    emit(events.Start(total_steps=total_steps, steps_per_epoch=per_epoch, resumed_at=state.step,
                      precision="bf16" if amp_dtype else "fp32", packed=feed.packed, threads=torch.get_num_threads(),
                      strategy=par.strategy, world_size=par.world_size, objective=cfg.objective.name))

    model.train()
    bar = None
    if progress:
        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    measured = False
    loop_started = time.perf_counter()
    saved_at = [None]  # the step of the newest checkpoint this run wrote

    def run_evaluation() -> bool:
        """Evaluate at this step, track the best weights (a kept checkpoint, when they may become the
        result), and say whether training should stop early."""
        if feed.evaluate is not None:
            state.last_eval_loss, state.last_eval_metrics = feed.evaluate()
        else:
            state.last_eval_loss, state.last_eval_metrics = evaluate(par, loss, feed.eval_batches, amp_dtype)
        if feed.score_task is not None:  # train.select_by: metric
            scored = {f"task/{k}": v for k, v in feed.score_task().items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}
            state.last_eval_metrics = (state.last_eval_metrics or {}) | scored
        state.last_eval_step = state.step
        emit(events.Eval(step=state.step, eval_loss=round(state.last_eval_loss, 6), metrics=state.last_eval_metrics))
        # What "best" means: the lowest validation loss, or (select_by: metric) the highest task metric.
        if cfg.select_by == "metric":
            selected_by = f"task/{feed.selection_metric}"
            value = state.last_eval_metrics[selected_by]
            # Small validation sets score in coarse steps: an equal score with a lower loss is better.
            improved = (state.best_value is None or value > state.best_value
                        or value == state.best_value and state.last_eval_loss < state.best_eval_loss)
        else:
            selected_by, value = "eval_loss", state.last_eval_loss
            improved = state.best_value is None or value < state.best_value
        if improved:
            state.best_step, state.best_eval_loss, state.best_value = state.step, state.last_eval_loss, value
            state.selected_by = selected_by
            state.best_eval_metrics, state.evals_since_best = state.last_eval_metrics, 0
            if cfg.select_best:
                # Announced before its checkpoint: a run resumed from that checkpoint keeps the line.
                emit(events.Best(step=state.step, metric=selected_by, value=round(value, 6)))
                if state.step < total_steps:  # the last step's weights are the model itself
                    path = save_checkpoint(run_dir, method, model, par, scheduler, state, cfg.keep_checkpoints,
                                           protect=state.best_step)
                    saved_at[0] = state.step
                    emit(events.Checkpoint(step=state.step, path=str(path)))
            return False
        state.evals_since_best += 1
        patience = cfg.early_stopping_patience
        if patience and state.evals_since_best >= patience:
            state.stopped_early = True
            what = "validation loss" if cfg.select_by == "loss" else f"validation {feed.selection_metric}"
            emit(events.Notice(f"early stopping at step {state.step}: {what} has not improved for "
                               f"{patience} evaluations (best {state.best_value:.4f} at step {state.best_step})"))
            return True
        return False

    with StopRequested() as stop, noisy_embeddings(model, cfg.neftune_alpha):
        while state.step < total_steps:
            started = time.perf_counter()
            batches = feed.batches_of_step(state.step)
            real = [b for b in batches if not b.get("padding")]
            # Units (targets, pairs...) and tokens of the whole global step: every rank normalizes alike.
            step_units, step_tokens, step_targets = (int(n) for n in par.all_sum(
                [sum(b["n_units"] for b in real), sum(b["n_tokens"] for b in real), sum(b["n_targets"] for b in real)]))
            loss_total, metric_sums = accumulate_step(par, loss, batches, amp_dtype, step_units)
            sums = par.all_sum([loss_total, float(stop.requested)] + [metric_sums[k] for k in loss.metric_names])
            loss_total, stop_requested = sums[0], sums[1] > 0  # all ranks stop at the same step
            metrics = {k: round(v / max(step_units, 1), 6) for k, v in zip(loss.metric_names, sums[2:])}
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
                                 tokens_per_second=round(step_tokens / elapsed, 1), total_steps=total_steps,
                                 metrics=metrics))
            if bar is not None:
                shown = {k.split("/")[-1]: f"{metrics[k]:.3f}" for k in progress_metrics if k in metrics}
                bar.set_postfix(loss=f"{loss_total:.4f}", **shown,
                                tok_s=f"{state.train_tokens / state.train_seconds:.0f}")
                bar.update(1)
            # The ranks' mean clock: every rank must plan the same step count.
            elapsed_all = (par.all_sum([time.perf_counter() - loop_started])[0] / par.world_size
                           if budget is not None else 0.0)
            if budget is not None and budget.replan_due(state.step, elapsed_all):
                total_steps = budget.plan(state.step, elapsed_all)
                state.planned_steps = total_steps
                scheduler = make_scheduler(optimizer, cfg, total_steps, last_step=state.step)
                if cfg.eval_every == "auto":
                    eval_every = auto.eval_every(total_steps)
                if bar is not None:
                    bar.total = total_steps
                    bar.refresh()
                emit(events.Notice(f"time budget {cfg.time_budget}: {total_steps} steps planned from "
                                   f"{budget.seconds_per_step:.2f} s per step"))
            stop_early = False
            if eval_every and state.step % eval_every == 0 and state.step < total_steps and feed.has_validation:
                stop_early = run_evaluation()
            should_save = cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps
            if (should_save or (stop_requested and state.step < total_steps)) and saved_at[0] != state.step:
                path = save_checkpoint(run_dir, method, model, par, scheduler, state, cfg.keep_checkpoints,
                                       protect=state.best_step if cfg.select_best else None)
                saved_at[0] = state.step
                emit(events.Checkpoint(step=state.step, path=str(path)))
            if stop_early:
                break
            if stop_requested and state.step < total_steps:
                if bar is not None:
                    bar.close()
                raise TrainingStopped(state.step, run_dir)
    if bar is not None:
        bar.close()
    if feed.has_validation and state.last_eval_step != state.step:
        total_steps = state.step  # the last step's weights are the model's own: no checkpoint for them
        run_evaluation()
    state.loop_seconds = time.perf_counter() - loop_started
    return state


class TimeBudget:
    """`train.time_budget`: time the first steps, then plan the step count so that the run ends near
    the budget; planned again at half the budget, since a CPU's speed drifts. Evaluations and
    checkpoints are in the measured time, so they are paid for out of the budget too."""

    CALIBRATION_STEPS = 3

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.planned = False  # after the calibration plan
        self.replanned = False  # after the mid-budget plan
        self.seconds_per_step = 0.0

    def replan_due(self, step: int, elapsed: float) -> bool:
        if not self.planned:
            return step >= self.CALIBRATION_STEPS
        return not self.replanned and elapsed >= self.seconds / 2

    def plan(self, step: int, elapsed: float) -> int:
        """The total step count for the budget, from the mean time per step so far."""
        if self.planned:
            self.replanned = True
        self.planned = True
        self.seconds_per_step = elapsed / max(step, 1)
        remaining = max(0.0, self.seconds - elapsed)
        return step + max(1, int(remaining / self.seconds_per_step))


class TrainingStopped(Exception):
    """Training was asked to stop (SIGINT/SIGTERM); a checkpoint at `step` allows --resume."""

    def __init__(self, step: int, run_dir: RunDir | None = None):
        super().__init__(f"stopped at step {step}; a checkpoint was saved")
        self.step, self.run_dir = step, run_dir
