"""The fine-tuning service under load: read load while a job trains, or one tenant flooding the engine.

    python benchmarks/api_load.py --clients 200 --requests 10
    python benchmarks/api_load.py --flood

Starts `slmtune api` (SQLite, one worker) in a fresh $SLMTUNE_HOME with SmolLM2-135M-Instruct as
the base, uploads examples/support_assistant/train.jsonl, creates a LoRA job and, once it is
running, lets `--clients` concurrent clients each send `--requests` requests, alternating
`GET /v1/fine_tuning/jobs` and `GET /v1/fine_tuning/jobs/{id}`. Prints p50/p99 latency, the
request rate and the error count, then cancels the job and stops the server. Everything talks to
127.0.0.1 only.

With --flood: `slmtune api` serving the base model (no workers), two tenants. A "probe" tenant
sends small chat requests one after another (16 tokens, greedy), first alone, then while a "flood"
tenant keeps --flood-clients heavy requests in flight (n=--flood-n choices of --flood-max-tokens
sampled tokens each). Runs once with continuous batching (requests join the running batch) and once
without (they wait for it to end), and prints the probe's p50/p99 latency alone and under the flood
side by side, with the flood's generated tokens/s.
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


def start_api(model_dir: Path, tenants: list[str], workers: int, extra_env: dict | None = None):
    """`slmtune api` in a fresh home serving `model_dir` as "smollm2"; returns (process, base URL, keys, home)."""
    home = Path(tempfile.mkdtemp(prefix="slmtune-api-bench-"))
    env = dict(os.environ, SLMTUNE_HOME=str(home), HF_HUB_OFFLINE="1") | (extra_env or {})
    cli = [sys.executable, "-m", "slmtune.cli"]
    keys = {}
    for tenant in tenants:
        out = subprocess.run(cli + ["keys", "create", "--tenant", tenant], env=env, capture_output=True, text=True,
                             check=True)
        keys[tenant] = out.stdout.strip().splitlines()[-1]
    port = free_port()
    server = subprocess.Popen(cli + ["api", "--port", str(port), "--workers", str(workers), "--models",
                                     f"smollm2={model_dir}", "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}/v1"
    for _ in range(120):
        try:
            call(f"{base}/models", keys[tenants[0]])
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    return server, base, keys, home


def chat(base: str, key: str, body: dict) -> dict:
    return call(f"{base}/chat/completions", key, "POST", json.dumps({"model": "smollm2"} | body).encode(),
                "application/json")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flood(args, model_dir: Path) -> None:
    """One tenant floods the engine with heavy requests; another's small requests' latency."""
    rows = []
    for continuous in (True, False):
        server, base, keys, home = start_api(model_dir, ["probe", "flood"], workers=0, extra_env={
            "SLMTUNE_SERVE_CONTINUOUS_BATCHING": str(continuous).lower()})
        try:
            def probe(count: int) -> list[float]:
                latencies = []
                for i in range(count):
                    started = time.perf_counter()
                    chat(base, keys["probe"], {"messages": [{"role": "user", "content": f"Say hello to guest {i}."}],
                                               "max_tokens": 16, "temperature": 0})
                    latencies.append(time.perf_counter() - started)
                return latencies

            probe(3)  # warm-up
            alone = probe(args.probes)
            stop, generated, lock = threading.Event(), [0], threading.Lock()

            def flooder(c: int) -> None:
                while not stop.is_set():
                    answer = chat(base, keys["flood"], {
                        "messages": [{"role": "user", "content": f"Write a very long story about dragon {c}."}],
                        "max_tokens": args.flood_max_tokens, "n": args.flood_n, "temperature": 1.0})
                    with lock:
                        generated[0] += answer["usage"]["completion_tokens"]

            threads = [threading.Thread(target=flooder, args=(c,)) for c in range(args.flood_clients)]
            for t in threads:
                t.start()
            time.sleep(3)  # the flood's first batch is running
            started, before = time.perf_counter(), generated[0]
            under = probe(args.probes)
            window = time.perf_counter() - started
            flood_rate = (generated[0] - before) / window  # tokens of flood requests that ended in the window
            stop.set()
            for t in threads:
                t.join()
        finally:
            server.terminate()
            server.wait(timeout=60)
        rows.append((continuous, alone, under, flood_rate))
    print(f"\nprobe: {args.probes} sequential chat requests (16 tokens, greedy) of one tenant, alone and while "
          f"another keeps {args.flood_clients} requests of n={args.flood_n} x {args.flood_max_tokens} sampled tokens "
          f"in flight; {os.cpu_count()} CPU cores, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'batching':<22} {'alone p50':>9} {'alone p99':>9} {'flood p50':>9} {'flood p99':>9} "
          f"{'p99 ratio':>9} {'flood tok/s':>11}")
    for continuous, alone, under, rate in rows:
        name = "continuous (joins)" if continuous else "waits for the batch"
        print(f"{name:<22} {1000 * percentile(alone, 0.5):>7.0f}ms {1000 * percentile(alone, 0.99):>7.0f}ms "
              f"{1000 * percentile(under, 0.5):>7.0f}ms {1000 * percentile(under, 0.99):>7.0f}ms "
              f"{percentile(under, 0.99) / percentile(alone, 0.99):>8.1f}x {rate:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--flood", action="store_true", help="measure a tenant's latency while another floods")
    parser.add_argument("--probes", type=int, default=30, help="--flood: the probe tenant's requests per phase")
    parser.add_argument("--flood-clients", type=int, default=4)
    parser.add_argument("--flood-n", type=int, default=4)
    parser.add_argument("--flood-max-tokens", type=int, default=200)
    args = parser.parse_args()
    from slmtune.models import resolve  # after parsing: --help stays fast

    if args.flood:
        return flood(args, resolve(args.model))

    server, base, keys, home = start_api(resolve(args.model), ["bench"], workers=1)
    key = keys["bench"]
    try:
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
