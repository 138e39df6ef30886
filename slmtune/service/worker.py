"""A worker: claims queued jobs, runs each in a `slmtune train ... --json-events --no-progress`
subprocess, sends heartbeats and streams the training events into the store.

    slmtune worker [--db URL]      # or started by `slmtune api --workers N`

- The subprocess dies with its worker (PR_SET_PDEATHSIG on Linux), so a SIGKILLed worker leaves no
  orphan training behind; its job goes back to the queue once its heartbeat is older than
  heartbeat_timeout, and the next worker resumes it with `slmtune train --resume RUN_DIR`.
- Every heartbeat returns the job's status: cancelled or paused -> SIGTERM (the trainer writes a
  checkpoint and exits); a job taken over by someone else -> SIGKILL.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from sqlalchemy.exc import DBAPIError

from slmtune import atomic
from slmtune.service.models import File
from slmtune.service.settings import Settings
from slmtune.service.store import Store, new_id
from slmtune.training import events
from slmtune.training.rundir import RunDir


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: heartbeats still protect the job
        pass


MAX_DB_BACKOFF = 30.0  # seconds between retries while the database is unreachable


class Worker:
    def __init__(self, settings: Settings, store: Store | None = None, worker_id: str | None = None):
        self.settings = settings
        self.store = store or Store(settings.db_url)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_id('w', 3)}"
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

    # --- one job --------------------------------------------------------------------------------
    def run_job(self, job) -> None:
        run_dir = RunDir(job.run_dir)
        job_dir = run_dir.path.parent
        job_dir.mkdir(parents=True, exist_ok=True)
        if run_dir.is_finished():  # trained, but the previous worker died before recording it
            self._succeed(job, run_dir)
            return
        if job.attempts > self.settings.max_attempts:
            message = (f"the job was started {job.attempts - 1} times and its worker stopped each time "
                       "(killed, or out of memory?)")
            self.store.finish(job.id, self.id, "failed", error={"code": "worker_lost", "message": message,
                                                                 "param": None}, message=f"Job failed: {message}")
            return
        checkpoint = run_dir.latest_checkpoint()
        base = [sys.executable, "-m", "slmtune.cli", "train"]
        if checkpoint is not None:
            cmd = base + ["--resume", str(run_dir.path)]
            self.store.append_event(job.id, f"Resuming from checkpoint {checkpoint.name} (attempt {job.attempts})")
        else:
            recipe = job_dir / "recipe.yaml"
            recipe.write_text(yaml.safe_dump(job.resolved["recipe"], sort_keys=False))
            cmd = base + [str(recipe)]
            self.store.append_event(job.id, "Fine-tuning job started")
        cmd += ["--json-events", "--no-progress"]
        log_path = job_dir / f"train-{job.attempts}.log"
        env = os.environ | {"SLMTUNE_HOME": str(self.settings.home), "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            outcome, error = self._follow(job, proc)
        if outcome == "lost":
            return
        if outcome in ("cancelled", "paused"):
            self.store.release(job.id, self.id)
            return
        if outcome == "interrupted":
            self.store.requeue(job.id, self.id)
            return
        if proc.returncode == 0 and run_dir.is_finished():
            self._succeed(job, run_dir)
            return
        message = error or self._error_message(log_path, proc.returncode)
        data = job.resolved["recipe"]["data"]
        for path, file_id in ((data.get("train"), job.training_file), (data.get("validation"), job.validation_file)):
            if path and file_id:
                message = message.replace(path, file_id)  # name the user's file, not our disk layout
        if not self.store.finish(job.id, self.id, "failed",
                                 error={"code": "training_failed", "message": message, "param": None},
                                 message=f"Job failed: {message}"):
            self.store.release(job.id, self.id)

    def _follow(self, job, proc) -> tuple[str, str | None]:
        """Relay events until the process exits; returns the outcome ("done", "cancelled", "paused",
        "interrupted" or "lost") and the trainer's error message, if it reported one."""
        lines: queue.Queue = queue.Queue()

        def read():
            for raw in proc.stdout:
                lines.put(raw)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        state = {"total": None, "last": {}, "error": None}
        next_beat = time.monotonic() + self.settings.heartbeat_interval
        outcome, stop_sent = "done", None
        while True:
            try:
                raw = lines.get(timeout=max(0.05, next_beat - time.monotonic()))
            except queue.Empty:
                raw = ""
            if raw is None:
                proc.wait()
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
                    proc.kill()
                    proc.wait()
                    return "lost", None
                if status != "running" and stop_sent is None:
                    # cancelled, paused, or paused and already resumed (queued): checkpoint, stop, let go
                    outcome, stop_sent = ("cancelled" if status == "cancelled" else "paused"), time.monotonic()
                    proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits
                if self.stopping.is_set() and stop_sent is None:  # this worker is shutting down
                    outcome, stop_sent = "interrupted", time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                if stop_sent is not None and time.monotonic() - stop_sent > 60:
                    proc.kill()

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
            self.store.append_event(job.id, f"Best validation loss so far at step {ev.step}: {ev.value:.4f}",
                                    type="metrics", data={"step": ev.step, "best_step": ev.step, "best_valid_loss": ev.value})
        elif isinstance(ev, events.Notice):
            self.store.append_event(job.id, ev.message, level="warn")
        elif isinstance(ev, events.Error):
            state["error"] = ev.message[:2000]

    def _succeed(self, job, run_dir: RunDir) -> None:
        summary = run_dir.summary()
        result = write_result_file(self.settings, self.store, job, run_dir)
        result_step = summary.get("result_step") or summary["steps"]
        # The model is the weights of result_step: the best evaluation's when the last step's were worse.
        self.store.add_checkpoint(job.id, summary["steps"], str(run_dir.artifact()),
                                  {"step": summary["steps"], "train_loss": summary.get("final_train_loss"),
                                   "valid_loss": summary.get("eval_loss"), "final": True,
                                   "result_step": result_step, "best": summary.get("best_step") == result_step}
                                  | {f"valid_{k}": v for k, v in (summary.get("eval_metrics") or {}).items()})
        name = job.resolved["fine_tuned_model"]
        chosen = (f" (the weights of step {result_step}, the best validation loss)"
                  if result_step != summary["steps"] else "")
        if not self.store.finish(job.id, self.id, "succeeded", fine_tuned_model=name,
                                 trained_tokens=int(summary.get("train_tokens") or 0), result_files=[result],
                                 message=f"The job has successfully completed; new model: {name}{chosen}"):
            self.store.release(job.id, self.id)  # cancelled meanwhile: the user's word stands

    @staticmethod
    def _error_message(log_path: Path, returncode: int) -> str:
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        errors = [line[len("error: "):] for line in text.splitlines() if line.startswith("error: ")]
        if errors:
            return errors[-1][:2000]
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        return (f"training exited with code {returncode}" + (": " + " | ".join(tail) if tail else ""))[:2000]


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
