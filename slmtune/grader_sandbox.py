"""Python graders in a sandboxed subprocess: the user's `grade(sample, item)` never runs in our process.

    score = run_python(source, sample={"output_text": "42"}, item={"answer": "42"})

Each call starts `python -I` (isolated: no user site-packages, no PYTHON* variables) in a fresh,
empty working directory that is removed afterwards, with:
  - an environment of PATH and LANG only (no inherited secrets: API keys, database URLs);
  - limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), written file size (RLIMIT_FSIZE),
    no core files, and a wall-clock timeout; stdout is read up to OUTPUT_LIMIT bytes;
  - no network: a new, empty network namespace where the kernel lets this user make one
    (unshare(CLONE_NEWNET)), and in any case a Python audit hook that refuses sockets, subprocesses,
    forks and ctypes' dlopen before the grader's code runs (the hook is what stops a grader where
    namespaces are not permitted, e.g. an unprivileged container).
What it does not isolate: reading files the server's user can read. The service refuses python
graders unless its operator starts it with `--allow-python-graders`.
Failures raise GradingFailed("python_grader_runtime_error", details): a grader that raised, looped
past its limits, used too much memory, returned something other than a finite number.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from slmtune.graders import GradingFailed

CPU_SECONDS = 5
WALL_SECONDS = 10
MEMORY_BYTES = 1 << 30  # address space: Python and numpy import in ~300 MB of it
FILE_BYTES = 1 << 20
OUTPUT_LIMIT = 64 * 1024
CLONE_NEWNET = 0x40000000
RESULT_MARK = "__slmtune_grade__"

# Runs in the child: reads {"sample", "item"} from stdin, guards, then runs the grader's source.
RUNNER = f'''
import json, sys
request = json.load(sys.stdin)
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.forkpty", "pty.", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "sys.addaudithook")
def guard(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"{{event}} is not allowed in a python grader")
sys.addaudithook(guard)
namespace = {{"__name__": "grader"}}
exec(compile(open("grader.py").read(), "grader.py", "exec"), namespace)
score = namespace["grade"](request["sample"], request["item"])
print("{RESULT_MARK}" + json.dumps(float(score)))
'''


def _limit_child() -> None:  # runs in the child between fork and exec
    os.setsid()
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:  # an empty network namespace: no interface but a down loopback. EPERM where not allowed.
        ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)
    except (OSError, AttributeError):
        pass


def run_python(source: str, sample: dict, item: dict) -> float:
    """The score `grade(sample, item)` returns, computed in a sandboxed subprocess."""
    with tempfile.TemporaryDirectory(prefix="slmtune-grader-") as work:
        Path(work, "grader.py").write_text(source)
        Path(work, "runner.py").write_text(RUNNER)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            done = subprocess.run([sys.executable, "-I", "runner.py"], cwd=work, env=env,
                                  input=json.dumps({"sample": sample, "item": item}), capture_output=True,
                                  text=True, timeout=WALL_SECONDS, preexec_fn=_limit_child)
        except subprocess.TimeoutExpired:
            raise GradingFailed("python_grader_runtime_error", f"the grader ran past {WALL_SECONDS} s") from None
    out, err = done.stdout[-OUTPUT_LIMIT:], done.stderr[-OUTPUT_LIMIT:]
    if done.returncode != 0:
        if done.returncode in (-9, -24, 152):  # SIGKILL / SIGXCPU: the CPU limit
            raise GradingFailed("python_grader_runtime_error", f"the grader used more than {CPU_SECONDS} s of CPU")
        last = err.strip().splitlines()[-1] if err.strip() else f"exit status {done.returncode}"
        raise GradingFailed("python_grader_runtime_error", last[:500])
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            score = json.loads(line[len(RESULT_MARK):])
            if not math.isfinite(score):
                break
            return float(score)
    raise GradingFailed("python_grader_runtime_error", "grade() must return a finite number")
