"""Where a job's trainer runs: the worker's side of it, behind one small protocol.

    executor = make_executor(settings)          # SLMTUNE_EXECUTOR: local (default) or kubernetes
    execution = executor.start(job, run_dir, args)
    while (line := execution.read(timeout=1.0)) is not None: ...   # the trainer's JSON events
    execution.exit()                             # Exit(ok, error, retry)

The worker (service/worker.py) owns everything else, the same for both executors: claiming, the
recipe or `--resume` (trainer_args), heartbeats, relaying events into the store, cancel/pause (stop:
the trainer checkpoints and exits), retries, the job's result. The local executor runs
`slmtune train` as a subprocess of the worker; the Kubernetes executor (service/kubernetes.py) runs
it as a batch/v1 Job and reads its events from the shared run directory.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from slmtune.service.settings import Settings
from slmtune.training.rundir import RunDir


@dataclass(frozen=True)
class Exit:
    """How a trainer ended. `ok`: exit code 0. `error`: what went wrong, in the platform's words
    (the trainer's own error event, when it sent one, takes precedence in the worker). `retry`: the
    platform took the trainer away (evicted, OOM-killed): the worker restarts it from its checkpoint."""

    ok: bool
    error: str | None = None
    retry: bool = False


class Execution(Protocol):
    """One running trainer."""

    stop_timeout: float  # seconds stop() may take before kill()

    def read(self, timeout: float) -> bytes | None:
        """The next line of the trainer's JSON events; b"" when none came within `timeout`; None
        once the trainer has exited and every line was read."""

    def stop(self) -> None:
        """Ask the trainer to write a checkpoint and exit (cancel, pause)."""

    def kill(self) -> None:
        """End the trainer now (it did not stop within stop_timeout)."""

    def leave(self) -> bool:
        """The worker shuts down. True: the trainer keeps running and the next worker to claim the
        job takes it over; False: it was asked to stop (checkpoint) and read() runs on until it exits."""

    def abandon(self) -> None:
        """Another worker owns the job now: stop following; never write anything for it."""

    def exit(self) -> Exit:
        """After read() returned None."""


class Executor(Protocol):
    def start(self, job, run_dir: RunDir, args: list[str]) -> Execution:
        """Run `slmtune <args>` for `job`."""

    def left_behind(self, job) -> Execution | None:
        """The trainer a previous worker of `job` left (running, or ended before that worker recorded
        its end), to follow instead of starting one; None when there is none."""

    def tidy(self, job_status: Callable[[str], str | None]) -> None:
        """Between jobs: end trainers that outlived their worker and are no longer wanted."""


def trainer_args(run_dir: RunDir, recipe_file: Path | None) -> list[str]:
    """`slmtune` arguments that train a job: from its recipe file, or `--resume` from its run
    directory's latest checkpoint (recipe_file None), events as JSON lines."""
    source = [str(recipe_file)] if recipe_file is not None else ["--resume", str(run_dir.path)]
    return ["train", *source, "--json-events", "--no-progress"]


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes  # only here: Linux's prctl through libc

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: heartbeats still protect the job
        pass


class LocalExecution:
    """`slmtune train` as a subprocess of the worker: events on its stdout, stderr into a log file.
    The subprocess dies with its worker (PR_SET_PDEATHSIG on Linux), so a SIGKILLed worker leaves
    no orphan training behind."""

    stop_timeout = 60.0

    def __init__(self, cmd: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw)
        self.lines.put(None)

    def read(self, timeout: float) -> bytes | None:
        try:
            raw = self.lines.get(timeout=timeout)
        except queue.Empty:
            return b""
        if raw is None:
            self.proc.wait()
        return raw

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits

    def kill(self) -> None:
        self.proc.kill()

    def leave(self) -> bool:
        self.stop()
        return False

    def abandon(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def exit(self) -> Exit:
        code = self.proc.returncode  # the log also explains an exit 0 that left no result
        return Exit(ok=code == 0, error=log_error(self.log_path, code))


def log_error(log_path: Path, returncode: int) -> str:
    """The trainer's last `error: ...` line in its log, else the log's last lines."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        text = ""
    errors = [line[len("error: "):] for line in text.splitlines() if line.startswith("error: ")]
    if errors:
        return errors[-1][:2000]
    tail = [line for line in text.splitlines() if line.strip()][-3:]
    return (f"training exited with code {returncode}" + (": " + " | ".join(tail) if tail else ""))[:2000]


class LocalExecutor:
    def __init__(self, settings: Settings):
        self.settings = settings

    def start(self, job, run_dir: RunDir, args: list[str]) -> LocalExecution:
        env = os.environ | {"SLMTUNE_HOME": str(self.settings.home), "PYTHONUNBUFFERED": "1"}
        log_path = run_dir.path.parent / f"train-{job.attempts}.log"
        return LocalExecution([sys.executable, "-m", "slmtune.cli", *args], env, log_path)

    def left_behind(self, job) -> None:
        return None  # a local trainer dies with its worker

    def tidy(self, job_status: Callable[[str], str | None]) -> None:
        pass


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "kubernetes":
        from slmtune.service.kubernetes import KubernetesExecutor  # the kubernetes client: only when used

        return KubernetesExecutor(settings)
    return LocalExecutor(settings)
