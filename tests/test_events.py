"""The event protocol (slmtune/training/events.py): one wire format from trainer to consumers.

Round trips for every kind, and the contract: what `slmtune train --json-events` prints is what the
service's worker parses and stores (a real trainer subprocess and a real store)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from slmtune.service.settings import Settings
from slmtune.service.store import Store
from slmtune.service.worker import Worker
from slmtune.training import events
from tests.conftest import write_jsonl

EXAMPLES = [
    events.Start(total_steps=4, steps_per_epoch=2, resumed_at=1, precision="bf16", packed=True, threads=2),
    events.Step(step=3, epoch=1.5, loss=1.25, lr=1e-4, grad_norm=0.5, tokens=300, tokens_per_second=99.5,
                total_steps=4, metrics={"rewards/margin": 0.25}),
    events.Eval(step=4, eval_loss=1.1, metrics={"reward_accuracy": 0.75}),
    events.Memory(step=1, state_bytes_per_rank=[{"total": 10}]),
    events.Checkpoint(step=2, path="/runs/x/checkpoints/step-000002"),
    events.Best(step=2, metric="eval_loss", value=1.0),
    events.Notice("a note"),
    events.End({"steps": 4, "eval_loss": None}),
    events.Error("data/train.jsonl:3: unknown_role", code="training_failed"),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.KIND)
def test_every_event_round_trips_through_its_one_format(event):
    line = events.to_json(event)
    assert json.loads(line)["event"] == event.KIND
    assert events.parse(line) == event


def test_metrics_are_flat_and_non_finite_numbers_become_null():
    step = events.Step(step=1, epoch=0.1, loss=float("nan"), lr=1.0, grad_norm=float("inf"), tokens=1,
                       tokens_per_second=1.0, metrics={"rewards/chosen": 0.5})
    data = events.to_dict(step)
    assert data["rewards/chosen"] == 0.5 and "metrics" not in data
    assert data["loss"] is None and data["grad_norm"] is None
    json.loads(json.dumps(data, allow_nan=False))


@pytest.mark.parametrize("bad", ['{"type": "step"}', '{"event": "nope"}', "[1]", "not json", '{"event": "step"}'])
def test_what_is_not_an_event_is_refused(bad):
    with pytest.raises(events.EventError):
        events.parse(bad)


def _worker(tmp_path):
    settings = Settings(home=tmp_path / "home", workers=0)
    store = Store(settings.db_url)
    store.migrate()
    return Worker(settings, store), store


def test_what_the_trainer_prints_is_what_the_worker_stores(tiny_llama_dir, chat_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "slmtune.cli", "train", "--model", str(tiny_llama_dir), "--data", str(chat_file),
         "--output", str(out), "--json-events", "--no-progress", "train.max_steps=4", "train.save_every=2",
         "data.validation_split=0.25", "train.eval_every=2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    emitted = [events.parse(line) for line in lines]  # every stdout line is an event
    kinds = [e.KIND for e in emitted]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 4 and "checkpoint" in kinds

    worker, store = _worker(tmp_path)
    job = SimpleNamespace(id="ftjob-contract")
    state = {"total": None, "last": {}, "error": None}
    for line in lines:
        worker.relay(job, line.encode(), state)
    stored = store.list_events(job.id, None, 100)[0]
    steps = [e.data for e in stored if e.data and "train_loss" in e.data]
    assert sorted(d["step"] for d in steps) == [1, 2, 3, 4]
    by_step = {e.step: e for e in emitted if isinstance(e, events.Step)}
    for data in steps:
        assert data["train_loss"] == by_step[data["step"]].loss and data["total_steps"] == 4
    assert any(e.data and e.data.get("valid_loss") is not None for e in stored)
    checkpoints = store.list_checkpoints(job.id, None, 10)[0]
    assert [c.step for c in checkpoints] == [2] and checkpoints[0].metrics["train_loss"] == by_step[2].loss
    # metrics.jsonl holds the same step, eval, best and warning events as the stream.
    from slmtune.training.rundir import MetricsLog, RunDir

    logged = [e for e in emitted if isinstance(e, MetricsLog.KINDS)]
    assert RunDir(out).metrics() == logged and {e.KIND for e in logged} >= {"step", "eval", "best"}


def test_a_users_error_reaches_the_worker_as_an_error_event(tiny_llama_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}] * 12)
    proc = subprocess.run(
        [sys.executable, "-m", "slmtune.cli", "train", "--model", str(tiny_llama_dir), "--data", str(bad),
         "--output", str(tmp_path / "run"), "--json-events", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    [error] = [events.parse(line) for line in proc.stdout.splitlines() if line.strip()]
    assert isinstance(error, events.Error) and "unknown_role" in error.message
    worker, _ = _worker(tmp_path)
    state = {"total": None, "last": {}, "error": None}
    worker.relay(SimpleNamespace(id="ftjob-x"), proc.stdout.encode(), state)
    assert state["error"] == error.message[:2000]  # the job keeps at most 2000 characters of it
