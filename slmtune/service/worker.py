"""A worker: claims queued jobs, runs each one's `slmtune train ... --json-events --no-progress`
through an executor (service/executors.py: a local subprocess, or a Kubernetes Job), sends
heartbeats and streams the training events into the store.

    slmtune worker [--db URL] [--executor local|kubernetes]   # or started by `slmtune api --workers N`

- A local trainer dies with its worker, so a SIGKILLed worker leaves no orphan training behind; its
  job goes back to the queue once its heartbeat is older than heartbeat_timeout, and the next worker
  resumes it with `slmtune train --resume RUN_DIR`. A Kubernetes trainer outlives its worker: the
  next worker to claim the job follows the same Kubernetes Job.
- Every heartbeat returns the job's status: cancelled or paused -> stop (SIGTERM: the trainer writes a
  checkpoint and exits); a job taken over by someone else -> abandon it.
- A trainer the platform took away (Kubernetes: evicted, OOM-killed) restarts from its checkpoint up
  to kubernetes_max_retries times, after a growing pause; then the job fails with the platform's reason.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import yaml
from sqlalchemy.exc import DBAPIError

from slmtune import atomic
from slmtune.service.executors import Executor, make_executor, trainer_args
from slmtune.service.models import File
from slmtune.service.settings import Settings
from slmtune.service.store import Store, new_id
from slmtune.training import events
from slmtune.training.rundir import RunDir

MAX_DB_BACKOFF = 30.0  # seconds between retries while the database is unreachable
MAX_RETRY_PAUSE = 300.0  # seconds, the longest pause before restarting a trainer the platform took away


def metric_label(selected_by: str) -> str:
    """What chose a best evaluation, as the job's events name it: "eval_loss" -> "loss", "task/f1" -> "f1"."""
    return selected_by.removeprefix("eval_").removeprefix("task/")


class Worker:
    def __init__(self, settings: Settings, store: Store | None = None, worker_id: str | None = None,
                 executor: Executor | None = None):
        self.settings = settings
        self.store = store or Store(settings.db_url)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_id('w', 3)}"
        self.executor = executor or make_executor(settings)
        self.stopping = threading.Event()

    def run_forever(self) -> None:
        """Claim and run jobs until stopped. A database that is briefly unreachable (restart,
        failover) is retried with a growing pause instead of ending the worker."""
        backoff = 0.0
        while not self.stopping.is_set():
            try:
                worked = self.run_once()
                backoff = 0.0
            except DBAPIError as err:
                backoff = min(MAX_DB_BACKOFF, max(self.settings.poll_interval, 2 * backoff))
                print(f"worker {self.id}: database error, retrying in {backoff:.1f}s: {str(err).splitlines()[0]}",
                      file=sys.stderr, flush=True)
                self.stopping.wait(backoff)
                continue
            if not worked:
                self.stopping.wait(self.settings.poll_interval)

    def run_once(self) -> bool:
        self.store.requeue_stale(self.settings.heartbeat_timeout)
        self.executor.tidy(self._job_status)
        job = self.store.claim(self.id, self.settings.heartbeat_timeout)
        if job is None:
            return False
        try:
            self.run_job(job)
        except Exception as err:  # noqa: BLE001 - a bug must fail the job, not kill the worker
            self.store.finish(job.id, self.id, "failed", error={"code": "server_error", "message": repr(err),
                                                                 "param": None},
                              message=f"Job failed: internal error {type(err).__name__}")
        return True

    def _job_status(self, job_id: str) -> str | None:
        job = self.store.get_job(job_id)
        return job.status if job is not None else None

    # --- one job --------------------------------------------------------------------------------
    def run_job(self, job) -> None:
        run_dir = RunDir(job.run_dir)
        job_dir = run_dir.path.parent
        job_dir.mkdir(parents=True, exist_ok=True)
        # A trainer a previous worker left (Kubernetes: its Job outlives the worker), running or ended
        # unrecorded: followed from where that worker stopped reading, not counted as a new attempt.
        execution = self.executor.left_behind(job)
        if execution is None and run_dir.is_finished():  # trained, but the previous worker died before recording it
            self._succeed(job, run_dir)
            return
        if execution is None and job.attempts > self.settings.max_attempts:
            message = (f"the job was started {job.attempts - 1} times and its worker stopped each time "
                       "(killed, or out of memory?)")
            self.store.finish(job.id, self.id, "failed", error={"code": "worker_lost", "message": message,
                                                                 "param": None}, message=f"Job failed: {message}")
            return
        retries = 0
        while True:
            if execution is not None:
                self.store.append_event(job.id, "Following the trainer another worker started")
            elif (checkpoint := run_dir.latest_checkpoint()) is not None:
                self.store.append_event(job.id, f"Resuming from checkpoint {checkpoint.name} (attempt {job.attempts})")
                execution = self.executor.start(job, run_dir, trainer_args(run_dir, None))
            else:
                recipe = job_dir / "recipe.yaml"
                atomic.write_text(recipe, yaml.safe_dump(job.resolved["recipe"], sort_keys=False))
                self.store.append_event(job.id, "Fine-tuning job started")
                execution = self.executor.start(job, run_dir, trainer_args(run_dir, recipe))
            outcome, error = self._follow(job, execution)
            if outcome in ("lost", "left"):
                return
            if outcome in ("cancelled", "paused"):
                self.store.release(job.id, self.id)
                return
            if outcome == "interrupted":
                self.store.requeue(job.id, self.id)
                return
            ended, execution = execution.exit(), None
            if run_dir.is_finished() and (ended.ok or ended.retry):  # (retry: gone after writing its result)
                self._succeed(job, run_dir)
                return
            if ended.retry and error is None and retries < self.settings.kubernetes_max_retries:
                retries += 1
                pause = min(MAX_RETRY_PAUSE, self.settings.kubernetes_retry_backoff * 2 ** (retries - 1))
                self.store.append_event(job.id, f"{ended.error}; the trainer restarts from its last checkpoint in "
                                                f"{pause:.0f} s (retry {retries} of {self.settings.kubernetes_max_retries})",
                                        level="warn")
                status = self._pause(job, pause)
                if status == "running":
                    continue
                if status is not None:  # cancelled or paused meanwhile
                    self.store.release(job.id, self.id)
                return
            self._fail(job, error or ended.error or "training failed")
            return

    def _pause(self, job, seconds: float) -> str | None:
        """Wait `seconds` while keeping the job's heartbeat; the job's status at the end (None: lost).
        A cancel, a pause or this worker shutting down ends the wait early."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                status = self.store.heartbeat(job.id, self.id)
            except DBAPIError:
                status = "running"
            if status != "running" or time.monotonic() >= deadline:
                return status
            if self.stopping.is_set():
                self.store.requeue(job.id, self.id)
                return "queued"
            self.stopping.wait(min(self.settings.heartbeat_interval, max(0.0, deadline - time.monotonic())))

    def _fail(self, job, message: str) -> None:
        data = job.resolved["recipe"]["data"]
        for path, file_id in ((data.get("train"), job.training_file), (data.get("validation"), job.validation_file)):
            if path and file_id:
                message = message.replace(path, file_id)  # name the user's file, not our disk layout
        if not self.store.finish(job.id, self.id, "failed",
                                 error={"code": "training_failed", "message": message, "param": None},
                                 message=f"Job failed: {message}"):
            self.store.release(job.id, self.id)

    def _follow(self, job, execution) -> tuple[str, str | None]:
        """Relay events until the trainer exits; returns the outcome ("done", "cancelled", "paused",
        "interrupted", "left" or "lost") and the trainer's error message, if it reported one."""
        state = {"total": None, "last": {}, "error": None}
        next_beat = time.monotonic() + self.settings.heartbeat_interval
        outcome, stop_sent = "done", None
        while True:
            raw = execution.read(timeout=max(0.05, next_beat - time.monotonic()))
            if raw is None:
                return outcome, state["error"]
            if raw:
                self.relay(job, raw, state)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.settings.heartbeat_interval
                try:
                    status = self.store.heartbeat(job.id, self.id)
                except DBAPIError:  # the database is away: training goes on, the next beat retries
                    continue
                if status is None:  # another worker owns the job now: stop at once, write nothing
                    execution.abandon()
                    return "lost", None
                if status != "running" and stop_sent is None:
                    # cancelled, paused, or paused and already resumed (queued): checkpoint, stop, let go
                    outcome, stop_sent = ("cancelled" if status == "cancelled" else "paused"), time.monotonic()
                    execution.stop()
                if self.stopping.is_set() and stop_sent is None:  # this worker is shutting down
                    if execution.leave():  # the trainer runs on; the next worker follows it
                        self.store.requeue(job.id, self.id)
                        return "left", None
                    outcome, stop_sent = "interrupted", time.monotonic()
                if stop_sent is not None and time.monotonic() - stop_sent > execution.stop_timeout:
                    execution.kill()
                    stop_sent = float("inf")  # once

    def relay(self, job, raw: bytes, state: dict) -> None:
        """Store one line of the trainer's --json-events output (other output is ignored)."""
        try:
            ev = events.parse(raw)
        except events.EventError:
            return
        if isinstance(ev, events.Start):
            state["total"] = ev.total_steps
            if ev.resumed_at:
                self.store.append_event(job.id, f"Training resumed at step {ev.resumed_at}/{state['total']}")
        elif isinstance(ev, events.Step):
            metrics = {"step": ev.step, "train_loss": ev.loss, "learning_rate": ev.lr, "tokens": ev.tokens,
                       "total_steps": ev.total_steps or state["total"], "epoch": ev.epoch} | ev.metrics
            state["last"] = metrics
            loss = f"{ev.loss:.4f}" if ev.loss is not None else "nan"
            reward = f", reward={ev.metrics['reward']:.4f}" if "reward" in ev.metrics else ""  # reinforcement
            self.store.append_event(job.id, f"Step {ev.step}/{metrics['total_steps']}: training loss={loss}{reward}",
                                    type="metrics", data=metrics)
        elif isinstance(ev, events.Eval):
            metrics = {"step": ev.step, "valid_loss": ev.eval_loss} | {f"valid_{k}": v for k, v in ev.metrics.items()}
            state["last"] = state["last"] | metrics
            loss = f"{ev.eval_loss:.4f}" if ev.eval_loss is not None else "nan"
            reward = f", reward={ev.metrics['reward']:.4f}" if "reward" in ev.metrics else ""
            self.store.append_event(job.id, f"Step {ev.step}: validation loss={loss}{reward}", type="metrics",
                                    data=metrics)
        elif isinstance(ev, events.Checkpoint):
            self.store.add_checkpoint(job.id, ev.step, ev.path, state["last"] | {"step": ev.step})
            self.store.append_event(job.id, f"Checkpoint created at step {ev.step}")
        elif isinstance(ev, events.Best):
            state["best"] = ev.step
            what = metric_label(ev.metric)
            self.store.append_event(job.id, f"Best validation {what} so far at step {ev.step}: {ev.value:.4f}",
                                    type="metrics", data={"step": ev.step, "best_step": ev.step,
                                                          f"best_valid_{what}": ev.value})
        elif isinstance(ev, events.Notice):
            self.store.append_event(job.id, ev.message, level="warn")
        elif isinstance(ev, events.Error):
            state["error"] = ev.message[:2000]

    def _succeed(self, job, run_dir: RunDir) -> None:
        summary = run_dir.summary()
        result = write_result_file(self.settings, self.store, job, run_dir)
        result_step = summary.get("result_step") or summary["steps"]
        best = summary.get("best_step") == result_step
        # The model is the weights of result_step: the best evaluation's when the last step's were worse.
        self.store.add_checkpoint(job.id, summary["steps"], str(run_dir.artifact()),
                                  {"step": summary["steps"], "train_loss": summary.get("final_train_loss"),
                                   "valid_loss": summary.get("eval_loss"), "final": True,
                                   "result_step": result_step, "best": best}
                                  | {f"valid_{k}": v for k, v in (summary.get("eval_metrics") or {}).items()})
        if best:
            self.store.mark_best_checkpoints(job.id, result_step)
        name = job.resolved["fine_tuned_model"]
        chosen = (f" (the weights of step {result_step}, the best validation "
                  f"{metric_label(summary.get('selected_by') or 'eval_loss')})"
                  if result_step != summary["steps"] else "")
        if not self.store.finish(job.id, self.id, "succeeded", fine_tuned_model=name,
                                 trained_tokens=int(summary.get("train_tokens") or 0), result_files=[result],
                                 message=f"The job has successfully completed; new model: {name}{chosen}"):
            self.store.release(job.id, self.id)  # cancelled meanwhile: the user's word stands


def main(settings: Settings) -> int:
    store = Store(settings.db_url)
    store.migrate()
    worker = Worker(settings, store)

    def stop(signum, frame):
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"worker {worker.id} waiting for jobs ({store.engine.url.render_as_string(hide_password=True)})",
          file=sys.stderr, flush=True)
    worker.run_forever()
    return 0


def write_result_file(settings: Settings, store: Store, job, run_dir: RunDir) -> str:
    """step_metrics.csv (step, train_loss, valid_loss, tokens) as a file of the job's tenant; its id.
    A reinforcement job (its steps carry `reward`) also gets OpenAI's RFT columns train_reward_mean and
    valid_reward_mean (the mean grader reward of the step's samples, of the validation pass)."""
    rows: dict[int, dict] = {}
    rewarded = False
    for event in run_dir.metrics():
        if isinstance(event, events.Eval):
            rows.setdefault(event.step, {}).update(valid_loss=event.eval_loss,
                                                   valid_reward_mean=event.metrics.get("reward"))
        elif isinstance(event, events.Step):
            rows.setdefault(event.step, {}).update(train_loss=event.loss, tokens=event.tokens,
                                                   train_reward_mean=event.metrics.get("reward"))
            rewarded = rewarded or "reward" in event.metrics
    columns = ["train_loss", "valid_loss", "tokens"] + (["train_reward_mean", "valid_reward_mean"] if rewarded else [])
    text = ",".join(["step"] + columns) + "\n" + "".join(
        ",".join([str(step)] + [_cell(r.get(c)) for c in columns]) + "\n" for step, r in sorted(rows.items()))
    file_id = new_id("file")
    path = settings.service_dir / "files" / f"{file_id}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)
    store.add_file(File(id=file_id, tenant_id=job.tenant_id, filename="step_metrics.csv",
                        purpose="fine-tune-results", bytes=len(text.encode()), path=str(path), format=None,
                        n_examples=0, created_at=time.time()))
    return file_id


def _cell(value) -> str:
    return "" if value is None else str(value)
