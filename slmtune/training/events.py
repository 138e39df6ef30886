"""The events a training run emits, and their one wire format.

    run(recipe, on_event=print)                      # Event objects, as the run emits them
    slmtune train recipe.yaml --json-events          # one `to_json(event)` line each on stdout
    slmtune train recipe.yaml --events-file PATH     # the same lines appended to PATH (Kubernetes Jobs)
    metrics.jsonl                                    # step, eval, best and warning events, the same lines

Every event serializes to a flat JSON object whose `"event"` key names its kind (`start`, `step`,
`eval`, `memory`, `checkpoint`, `best`, `warning`, `end`, `error`); `parse` turns such an object back
into the dataclass. Producers (training/loop.py, training/run.py, cli.py) and consumers
(metrics.jsonl readers, the service's worker) go through these two functions only.

Step and eval events carry the loss plus an objective's own metrics (`metrics`, flattened into the
object: DPO's rewards, GRPO's reward statistics), so a new objective adds metrics, not event kinds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar


@dataclass
class Event:
    KIND: ClassVar[str] = ""


@dataclass
class Start(Event):
    """Training is about to take its first step (or its first step after a resume)."""

    KIND: ClassVar[str] = "start"
    total_steps: int
    steps_per_epoch: int
    resumed_at: int = 0
    precision: str = "fp32"
    packed: bool = False
    threads: int = 1
    strategy: str = "none"
    world_size: int = 1
    objective: str = "sft"


@dataclass
class Step(Event):
    """One optimizer step finished (every train.log_every steps and the last)."""

    KIND: ClassVar[str] = "step"
    step: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    tokens_per_second: float
    total_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own (rewards/..., ...)


@dataclass
class Eval(Event):
    """A validation pass: its loss, and the objective's own validation metrics."""

    KIND: ClassVar[str] = "eval"
    step: int
    eval_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Memory(Event):
    """Parameter, gradient and optimizer bytes each process holds, measured at the first step."""

    KIND: ClassVar[str] = "memory"
    step: int
    state_bytes_per_rank: list


@dataclass
class Checkpoint(Event):
    KIND: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass
class Best(Event):
    """The run's result will be the weights of `step` (the best validation so far)."""

    KIND: ClassVar[str] = "best"
    step: int
    metric: str
    value: float


@dataclass
class Notice(Event):
    """Something the user should know that does not stop the run."""

    KIND: ClassVar[str] = "warning"
    message: str


@dataclass
class End(Event):
    """The run finished and wrote its result; `summary` is what summary.json holds."""

    KIND: ClassVar[str] = "end"
    summary: dict


@dataclass
class Error(Event):
    """The run stopped with an error meant for the user (a bad recipe, bad data...)."""

    KIND: ClassVar[str] = "error"
    message: str
    code: str = "training_failed"


KINDS: dict[str, type[Event]] = {cls.KIND: cls for cls in (Start, Step, Eval, Memory, Checkpoint, Best, Notice,
                                                           End, Error)}
FLATTENED = {Step: "metrics", Eval: "metrics", End: "summary"}  # dict fields spread into the object

EventSink = Callable[[Event], None]


class EventError(ValueError):
    """A JSON object that is not an event this version knows."""


def _finite(value):
    # json.dumps writes NaN/Infinity, which is not JSON; a diverged loss is reported as null.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_dict(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"event": event.KIND}
    spread = FLATTENED.get(type(event))
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == spread:
            out |= {k: _finite(v) for k, v in value.items() if k != "event"}
        else:
            out[f.name] = _finite(value)
    return out


def to_json(event: Event) -> str:
    return json.dumps(to_dict(event))


def append_line(path: str | Path, line: str) -> None:
    """Append one `to_json` line to an events file (`slmtune train --events-file`). One write of the
    whole line in append mode, so a reader tailing the file over a shared volume sees whole lines,
    and several writers (a torchrun launcher's error, rank 0's events) do not interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def parse(obj: Any) -> Event:
    """The event a `to_dict` object (or its JSON text) describes; raises EventError otherwise."""
    if isinstance(obj, (str, bytes)):
        try:
            obj = json.loads(obj)
        except ValueError as err:
            raise EventError(f"not JSON: {err}") from None
    if not isinstance(obj, dict) or obj.get("event") not in KINDS:
        raise EventError(f"not an event: {str(obj)[:200]}")
    cls = KINDS[obj["event"]]
    names = {f.name for f in dataclasses.fields(cls)}
    spread = FLATTENED.get(cls)
    known = {k: v for k, v in obj.items() if k in names and k != spread}
    if spread is not None:
        known[spread] = {k: v for k, v in obj.items() if k not in names and k != "event"}
    try:
        return cls(**known)
    except TypeError as err:
        raise EventError(f"{obj['event']} event: {err}") from None
