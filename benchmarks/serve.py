"""Serving throughput and latency: concurrency, adapters, PyTorch vs ONNX Runtime, vs a naive loop.

    python benchmarks/serve.py --threads 2 --max-tokens 64

One run prints one table. Rows:
  naive generate loop   one `model.generate` per request, sequentially, in this process (fp32;
                        "naive loop, bf16" with bfloat16 weights)
  torch, base, C        `slmtune serve` with C concurrent clients (C = 1, 4, 16) on the base model
  torch, 4 adapters     16 clients spread over 4 LoRA adapters (r=16, all linear layers) kept hot,
                        served in mixed-adapter batches
  torch bf16, ...       `slmtune serve --dtype bfloat16` (the default where the CPU has native bf16):
                        base with 1 and 16 clients, and 16 clients over the 4 adapters
  onnx fp32/int8/int4   `slmtune serve --backend onnx` on the base exported by onnxruntime-genai's
                        builder, 1 client
  llama.cpp f16/q8_0/q4_0  `slmtune serve --backend llamacpp` on the base written by `slmtune export
                        --format gguf --quant Q` (llama-cpp-python built from source), 1 and 16 clients
  llama_cpp.server ...  llama-cpp-python's own OpenAI-compatible server on the same file, same clients
The quick comparison of runtimes (what to deploy on a CPU):
    python benchmarks/serve.py --threads 2 --skip-naive --skip-adapters --skip-onnx
Agreement against PyTorch fp32 (the 1-client row's prompts): "agree" is the share of served tokens
that match before the first divergence; "next" is next-token agreement, the model fed PyTorch's
greedy answer and compared at every position (teacher forcing, no compounding; in this process).
Each server (and the naive loop) first answers one untimed request, so no row pays for kernel set-up.
Each client sends `--requests` chat requests one after another (greedy, max_tokens fixed);
tokens/s is the sum of completion tokens (from `usage`) over the scenario's wall time.
Run it with the machine otherwise idle; the thread count is printed with the table.
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
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHAT_TEST = REPO.parent / "shared" / "data" / "chat" / "test.jsonl"


def prompts(n: int) -> list[str]:
    with CHAT_TEST.open() as f:
        return [json.loads(next(f))["messages"][0]["content"] for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(model_dir: str, root: Path, n: int) -> dict[str, str]:
    """LoRA adapters with random (non-zero) weights: the compute of real ones, no training needed."""
    import peft
    import torch

    from slmtune.models import load_model

    out = {}
    for i in range(n):
        torch.manual_seed(i)
        net = peft.get_peft_model(load_model(model_dir), peft.LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.002)
        net.save_pretrained(root / f"adapter{i}")
        out[f"adapter{i}"] = str(root / f"adapter{i}")
    return out


class Server:
    """`slmtune serve ARGS` (or, with `command`, another OpenAI-compatible server given its port)."""

    def __init__(self, args: list[str], threads: int, command=None):
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
        argv = command(self.port) if command else [sys.executable, "-m", "slmtune.cli", "serve", *args, "--port",
                                                  str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL if command else None,
                                     stderr=subprocess.DEVNULL if command else None)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                models = json.loads(urllib.request.urlopen(f"{self.url}/models", timeout=2).read())
                self.model_id = models["data"][0]["id"]  # the served base (or the exported model)
                # One untimed request: the first forward passes pick and build kernels (oneDNN).
                chat(self.url, self.model_id, "Hello", 8)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit("server exited during start-up")
                time.sleep(1)
        raise SystemExit("server did not start in 300 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def chat(url: str, model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> tuple[str, int, float]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0} | (extra or {})).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        data = json.loads(response.read())
    return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"], time.perf_counter() - started


def load(url: str, models: list[str], clients: int, requests: int, texts: list[str], max_tokens: int,
         extra: dict | None = None) -> dict:
    latencies, tokens, outputs = [], [], {}
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            prompt = texts[(c * requests + r) % len(texts)]
            text, n, seconds = chat(url, models[c % len(models)], prompt, max_tokens, extra)
            with lock:
                latencies.append(seconds)
                tokens.append(n)
                outputs[prompt] = text

    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {"tokens_per_second": sum(tokens) / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "outputs": outputs,
            "requests": len(latencies)}


def naive_loop(model_dir: str, texts: list[str], max_tokens: int, dtype: str = "float32") -> dict:
    from slmtune.chat import generate_reply
    from slmtune.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, dtype=dtype).eval()
    generate_reply(model, tokenizer, [{"role": "user", "content": "Hello"}], max_new_tokens=8)  # untimed warm-up
    n_tokens, latencies = 0, []
    started = time.perf_counter()
    for text in texts:
        t = time.perf_counter()
        reply = generate_reply(model, tokenizer, [{"role": "user", "content": text}], max_new_tokens=max_tokens)
        latencies.append(time.perf_counter() - t)
        n_tokens += len(tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1
    wall = time.perf_counter() - started
    return {"tokens_per_second": n_tokens / wall, "p50": statistics.median(latencies), "p99": max(latencies)}


def agreement(reference: dict[str, str], other: dict[str, str], tokenizer) -> float:
    same = total = 0
    for prompt, ref in reference.items():
        a = tokenizer(ref, add_special_tokens=False)["input_ids"]
        b = tokenizer(other.get(prompt, ""), add_special_tokens=False)["input_ids"]
        prefix = 0
        for x, y in zip(a, b):
            if x != y:
                break
            prefix += 1
        same += prefix
        total += len(a)
    return same / total if total else 0.0


def reference_answers(model_dir: str, texts: list[str], max_tokens: int):
    """PyTorch fp32 greedy answers (token ids) to the given prompts, and the prompts' ids."""
    from slmtune.export.parity import greedy_tokens, prompt_ids
    from slmtune.generation import TorchDecoder, pad_id_of
    from slmtune.models import end_of_turn_ids, load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    eos = end_of_turn_ids(model, tokenizer)
    encoded = [prompt_ids(tokenizer, t) for t in texts]
    return encoded, greedy_tokens(TorchDecoder(model, pad_id_of(tokenizer, eos)), tokenizer, encoded, max_tokens, eos)


def next_token_agreement(count, prompt_ids, answers) -> float:
    return sum(count(ids, ref) for ids, ref in zip(prompt_ids, answers)) / max(1, sum(map(len, answers)))


def bf16_rows(args, flags, adapters, texts, single, tokenizer, rows, model_dir, prompt_ids, answers) -> None:
    """`slmtune serve --dtype bfloat16`: 1 and 16 clients (and the adapters), and its agreement."""
    from slmtune.export.parity import torch_next_token_matches
    from slmtune.models import load_model

    server = Server(flags + ["--dtype", "bfloat16"], args.threads)
    try:
        base_id = server.model_id
        for clients in (1, 16):
            result = load(server.url, [base_id], clients, args.requests, texts, args.max_tokens)
            if clients == 1:
                result["agreement"] = agreement(single["outputs"], result["outputs"], tokenizer)
                bf16_single = result
            rows.append(("torch bf16, base", clients, result))
        if adapters:
            rows.append(("torch bf16, 4 adapters", 16, load(server.url, list(adapters), 16, args.requests, texts,
                                                             args.max_tokens)))
    finally:
        server.close()
    bf16 = load_model(model_dir, dtype="bfloat16").eval()
    bf16_single["next"] = next_token_agreement(lambda ids, ref: torch_next_token_matches(bf16, ids, ref),
                                               prompt_ids, answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--skip-llamacpp-server", action="store_true",
                        help="no rows for llama-cpp-python's own server (pip install 'llama-cpp-python[server]')")
    parser.add_argument("--skip-naive", action="store_true", help="no naive generate loop rows")
    parser.add_argument("--skip-bf16", action="store_true",
                        help="no torch bf16 rows (on a CPU without native bf16 they only measure its emulation)")
    parser.add_argument("--skip-adapters", action="store_true", help="no adapter rows and no 4-client row")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from slmtune.models import load_tokenizer, resolve

    model_dir = resolve(args.model)
    tokenizer = load_tokenizer(model_dir)
    texts = prompts(64)
    work = Path(tempfile.mkdtemp(prefix="slmtune-serve-bench-"))
    rows = []

    if not args.skip_naive:
        naive = naive_loop(model_dir, texts[: args.requests * 2], args.max_tokens)
        rows.append(("naive generate loop", 1, naive))
        rows.append(("naive loop, bf16", 1, naive_loop(model_dir, texts[: args.requests * 2], args.max_tokens,
                                                       "bfloat16")))
    prompt_ids, answers = reference_answers(model_dir, texts[: args.requests], args.max_tokens)

    adapters = {} if args.skip_adapters else make_adapters(model_dir, work, 4)
    flags = ["--model", model_dir, "--max-batch-size", "16"]
    for name, path in adapters.items():
        flags += ["--adapter", f"{name}={path}"]
    server = Server(flags + ["--dtype", "float32"], args.threads)
    try:
        base_id = server.model_id
        single = None
        for clients in ((1, 16) if args.skip_adapters else (1, 4, 16)):
            result = load(server.url, [base_id], clients, args.requests, texts, args.max_tokens)
            single = single or result
            rows.append(("torch, base", clients, result))
        if adapters:
            rows.append(("torch, 4 adapters", 16, load(server.url, list(adapters), 16, args.requests, texts,
                                                        args.max_tokens)))
    finally:
        server.close()
    if not args.skip_bf16:
        bf16_rows(args, flags, adapters, texts, single, tokenizer, rows, model_dir, prompt_ids, answers)

    report(args, rows, single)  # the PyTorch rows now, in case an export fails below
    if not args.skip_onnx:
        import onnxruntime_genai as og

        from slmtune.export.onnx import build_onnx, onnx_next_token_matches

        for precision in ("fp32", "int8", "int4"):
            label = precision
            export = work / f"onnx-{precision}"
            (work / f"build-{precision}").mkdir()
            build_onnx(model_dir, export, precision, work_dir=work / f"build-{precision}")
            server = Server(["--backend", "onnx", "--model", str(export)], args.threads)
            try:
                model_id = server.model_id
                result = load(server.url, [model_id], 1, args.requests, texts, args.max_tokens)
                result["agreement"] = agreement(single["outputs"], result["outputs"], tokenizer)
                rows.append((f"onnx {label}", 1, result))
            finally:
                server.close()
            exported = og.Model(str(export))
            result["next"] = next_token_agreement(lambda ids, ref: onnx_next_token_matches(exported, ids, ref),
                                                  prompt_ids, answers)
            del exported

        report(args, rows, single)
    if not args.skip_llamacpp:
        from slmtune.export.gguf import LlamaCppCandidate, write_gguf
        from slmtune.models import load_model

        model = load_model(model_dir).eval()
        for quant in ("f16", "q8_0", "q4_0"):
            folder = work / f"gguf-{quant}"
            folder.mkdir()
            path = write_gguf(model, tokenizer, folder / "model.gguf", quant)
            server = Server(["--backend", "llamacpp", "--model", str(path), "--max-batch-size", "16"], args.threads)
            try:
                model_id = server.model_id
                for clients in (1, 16):
                    result = load(server.url, [model_id], clients, args.requests, texts, args.max_tokens)
                    if clients == 1:
                        result["agreement"] = agreement(single["outputs"], result["outputs"], tokenizer)
                        candidate = LlamaCppCandidate(path, n_threads=args.threads)
                        result["next"] = next_token_agreement(candidate.next_token_matches, prompt_ids, answers)
                        candidate.close()
                    rows.append((f"llama.cpp {quant}", clients, result))
            finally:
                server.close()
            if args.skip_llamacpp_server:
                continue
            # llama-cpp-python's own OpenAI-compatible server on the same file (the chat template
            # embedded in the GGUF), same clients: what slmtune's llama.cpp backend costs or saves.
            server = Server([], args.threads, command=lambda port, path=path: [
                sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
                "--n_threads", str(args.threads), "--n_ctx", "2048"])
            try:
                for clients in (1, 16):
                    # Its defaults sample with repeat_penalty 1.1, top_k 40 and min_p 0.05 even at
                    # temperature 0: switched off, so it decodes greedily like every other row.
                    result = load(server.url, [server.model_id], clients, args.requests, texts, args.max_tokens,
                                  extra={"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0})
                    if clients == 1:
                        result["agreement"] = agreement(single["outputs"], result["outputs"], tokenizer)
                    rows.append((f"llama_cpp.server {quant}", clients, result))
            finally:
                server.close()
        report(args, rows, single)


def report(args, rows, single) -> None:
    print(f"\nServing {args.model}, greedy, max_tokens {args.max_tokens}, {args.requests} requests per client, "
          f"{args.threads} threads")
    print(f"{'scenario':22} {'clients':>7} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'vs torch x1':>11} {'agree':>6} "
          f"{'next':>6}")
    for name, clients, r in rows:
        ratio = r["tokens_per_second"] / single["tokens_per_second"]
        agree = f"{100 * r['agreement']:.0f}%" if "agreement" in r else ""
        following = f"{100 * r['next']:.1f}%" if "next" in r else ""
        print(f"{name:22} {clients:>7} {r['tokens_per_second']:>9.1f} {r['p50']:>7.2f} {r['p99']:>7.2f} "
              f"{ratio:>10.2f}x {agree:>6} {following:>6}")


if __name__ == "__main__":
    main()
