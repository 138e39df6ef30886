"""The fine-tuning service under read load while a job trains: latency and errors.

    python benchmarks/api_load.py --clients 200 --requests 10

Starts `slmtune api` (SQLite, one worker) in a fresh $SLMTUNE_HOME with SmolLM2-135M-Instruct as
the base, uploads examples/support_assistant/train.jsonl, creates a LoRA job and, once it is
running, lets `--clients` concurrent clients each send `--requests` requests, alternating
`GET /v1/fine_tuning/jobs` and `GET /v1/fine_tuning/jobs/{id}`. Prints p50/p99 latency, the
request rate and the error count, then cancels the job and stops the server. Everything talks to
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, key: str, method: str = "GET", body: bytes | None = None, content_type: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} | ({"Content-Type": content_type} if content_type else {})
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def upload(base: str, key: str, path: Path) -> str:
    boundary = "slmtunebench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return call(f"{base}/files", key, "POST", body, f"multipart/form-data; boundary={boundary}")["id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    from slmtune.models import resolve

    model_dir = resolve(args.model)
    home = Path(tempfile.mkdtemp(prefix="slmtune-api-bench-"))
    env = dict(os.environ, SLMTUNE_HOME=str(home), HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-m", "slmtune.cli"]
    keys = subprocess.run(cli + ["keys", "create", "--tenant", "bench"], env=env, capture_output=True, text=True,
                          check=True)
    key = keys.stdout.strip().splitlines()[-1]
    port = free_port()
    server = subprocess.Popen(cli + ["api", "--port", str(port), "--workers", "1", "--models", f"smollm2={model_dir}",
                                     "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(120):
            try:
                call(f"{base}/models", key)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        file_id = upload(base, key, REPO / "examples" / "support_assistant" / "train.jsonl")
        job = call(f"{base}/fine_tuning/jobs", key, "POST", json.dumps({"model": "smollm2", "training_file": file_id})
                   .encode(), "application/json")
        while call(f"{base}/fine_tuning/jobs/{job['id']}", key)["status"] != "running":
            time.sleep(1)

        latencies, errors = [], []
        lock = threading.Lock()

        def client(c: int) -> None:
            for r in range(args.requests):
                url = f"{base}/fine_tuning/jobs" if (c + r) % 2 == 0 else f"{base}/fine_tuning/jobs/{job['id']}"
                started = time.perf_counter()
                try:
                    call(url, key)
                    ok = True
                except Exception as err:  # any failure counts: HTTP errors, resets, timeouts
                    ok, error = False, f"{type(err).__name__}: {err}"
                with lock:
                    latencies.append(time.perf_counter() - started)
                    if not ok:
                        errors.append(error)

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        status = call(f"{base}/fine_tuning/jobs/{job['id']}", key)["status"]
        call(f"{base}/fine_tuning/jobs/{job['id']}/cancel", key, "POST", b"", "application/json")
    finally:
        server.terminate()
        server.wait(timeout=60)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\n{args.clients} concurrent clients x {args.requests} requests (list jobs / retrieve job) while a "
          f"LoRA job on {args.model} trains (job status during the load: {status}); {os.cpu_count()} CPU cores")
    print(f"{'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    print(f"{len(latencies):>8} {len(errors):>6} {len(latencies) / wall:>7.1f} {1000 * statistics.median(latencies):>7.0f} "
          f"{1000 * p99:>7.0f} {1000 * latencies[-1]:>7.0f}")
    for error in sorted(set(errors))[:5]:
        print("error:", error)


if __name__ == "__main__":
    main()
