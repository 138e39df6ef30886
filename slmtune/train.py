"""The training loop: AdamW, warmup + schedule, gradient accumulation, clipping, checkpoints.

Read it top to bottom in `train()`. The loss of one optimizer step is the sum of token losses over
every micro-batch it accumulates, divided by the number of target tokens in all of them, so 4
micro-batches of 2 rows give exactly the loss and gradients of 1 micro-batch of 8 rows.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from slmtune.config import TrainSection
from slmtune.data.batching import collate, micro_batches, steps_per_epoch
from slmtune.data.tokenize import IGNORE, Example

Event = dict
EventSink = Callable[[Event], None]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. bf16 is autocast only: master weights and optimizer stay fp32."""
    if precision == "bf16" or (precision == "auto" and has_native_bf16(device)):
        return torch.bfloat16
    return None


def target_loss_sum(model, batch: dict, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Sum of next-token cross-entropy over target positions only.

    The LM head runs on target positions alone: prompt tokens need no logits, and a full
    tokens x vocabulary logits tensor (49k columns for SmolLM2) is the largest activation of a step.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    targets = batch["targets"].to(device)
    select = targets != IGNORE
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return _prompt_learning_loss_sum(model, batch, targets, select, amp_dtype)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        hidden = base.get_decoder()(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=False,
        ).last_hidden_state
        logits = base.get_output_embeddings()(hidden[select])
    logits = logits.float()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets[select], reduction="sum")


def accumulate_gradients(model, batches: list[dict], amp_dtype: torch.dtype | None) -> float:
    """Backward over the micro-batches of one optimizer step; returns the step's mean token loss.

    Each micro-batch's summed loss is divided by the target tokens of *all* of them, so the
    gradients equal those of one big batch however the step is split.
    """
    step_targets = max(sum(b["n_targets"] for b in batches), 1)
    total = 0.0
    for batch in batches:
        loss = target_loss_sum(model, batch, amp_dtype) / step_targets
        loss.backward()
        total += loss.item()
    return total


def _prompt_learning_loss_sum(model, batch, targets, select, amp_dtype) -> torch.Tensor:
    """Prompt and prefix tuning inject virtual tokens inside PeftModel.forward, so they need the
    full forward (and an unpacked 2D mask); logits of virtual positions come first and are dropped."""
    device = targets.device
    input_ids = batch["input_ids"].to(device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits[:, -input_ids.shape[1]:][select].float()
    return F.cross_entropy(logits, targets[select], reduction="sum")


@torch.no_grad()
def evaluate_loss(model, batches: list[dict], amp_dtype) -> float | None:
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += target_loss_sum(model, batch, amp_dtype).item()
        count += batch["n_targets"]
    model.train(was_training)
    return total / max(count, 1)


def make_scheduler(optimizer, cfg: TrainSection, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

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


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, method, model, optimizer, scheduler, state: TrainState, keep: int) -> Path:
    """Write checkpoints/step-N atomically (temp dir, then rename) and prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    method.save_trained(model, tmp / method.ARTIFACT)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")
    _atomic_json(tmp / "state.json", state.__dict__)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    found = sorted(p for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, method, model, optimizer, scheduler) -> TrainState:
    method.load_trained(model, path / method.ARTIFACT)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**json.loads((path / "state.json").read_text()))


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
    run_dir: Path,
    pad_id: int,
    packed: bool,
    attn_implementation: str,
    resume_from: Path | None = None,
    emit: EventSink = lambda event: None,
    progress: bool = True,
) -> TrainState:
    """Train `model` in place. Returns the final state; the caller saves the result."""
    device = next(model.parameters()).device
    amp_dtype = autocast_dtype(cfg.precision, device)
    per_epoch = steps_per_epoch(len(train_rows), cfg.micro_batch_size, cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
    )
    scheduler = make_scheduler(optimizer, cfg, total_steps)

    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, method, model, optimizer, scheduler)
    else:
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    emit({"type": "start", "total_steps": total_steps, "steps_per_epoch": per_epoch, "resumed_at": state.step,
          "precision": "bf16" if amp_dtype else "fp32", "packed": packed, "threads": torch.get_num_threads()})

    def batches_of_step(step: int) -> list[dict]:
        epoch, index = divmod(step, per_epoch)
        epoch_batches = micro_batches(train_rows, cfg.micro_batch_size, cfg.seed, epoch)
        chosen = epoch_batches[index * cfg.gradient_accumulation_steps : (index + 1) * cfg.gradient_accumulation_steps]
        return [collate([[train_examples[i] for i in row] for row in mb], pad_id, packed, attn_implementation)
                for mb in chosen]

    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    with StopRequested() as stop:
        while state.step < total_steps:
            started = time.perf_counter()
            batches = batches_of_step(state.step)
            step_targets = sum(b["n_targets"] for b in batches)
            step_tokens = sum(b["n_tokens"] for b in batches)
            loss_total = accumulate_gradients(model, batches, amp_dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            elapsed = time.perf_counter() - started
            state.step += 1
            state.train_tokens += step_tokens
            state.target_tokens += step_targets
            state.train_seconds += elapsed
            state.last_loss = loss_total
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                emit({"type": "step", "step": state.step, "epoch": round(state.step / per_epoch, 4),
                      "loss": round(loss_total, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                      "tokens": state.train_tokens, "tokens_per_second": round(step_tokens / elapsed, 1)})
            if bar is not None:
                bar.set_postfix(loss=f"{loss_total:.4f}", tok_s=f"{state.train_tokens / state.train_seconds:.0f}")
                bar.update(1)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps and eval_batches:
                state.last_eval_loss = evaluate_loss(model, eval_batches, amp_dtype)
                emit({"type": "eval", "step": state.step, "eval_loss": round(state.last_eval_loss, 6)})
            should_save = cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps
            if should_save or (stop.requested and state.step < total_steps):
                path = save_checkpoint(run_dir, method, model, optimizer, scheduler, state, cfg.keep_checkpoints)
                emit({"type": "checkpoint", "step": state.step, "path": str(path)})
            if stop.requested and state.step < total_steps:
                if bar is not None:
                    bar.close()
                raise TrainingStopped(state.step)
    if bar is not None:
        bar.close()
    if eval_batches:
        state.last_eval_loss = evaluate_loss(model, eval_batches, amp_dtype)
        emit({"type": "eval", "step": state.step, "eval_loss": round(state.last_eval_loss, 6)})
    return state


class TrainingStopped(Exception):
    """Training was asked to stop (SIGINT/SIGTERM); a checkpoint at `step` allows --resume."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}; a checkpoint was saved")
        self.step = step
