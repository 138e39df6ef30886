"""Training throughput and memory: slmtune vs TRL's SFTTrainer, side by side in one run.

    .venv/bin/pip install "trl~=1.16.0"          # the comparison needs TRL; slmtune does not
    python benchmarks/train_throughput.py --rows 400 --threads 2 --repeats 2 [--levers]

Both train SmolLM2-135M-Instruct with LoRA r=16, alpha=32, dropout 0 on all linear layers, one
epoch over the first `--rows` conversations of ../shared/data/chat/train.jsonl, learning rate
2e-4 with a linear schedule and no warmup, bf16 autocast, loss on assistant tokens only (TRL:
conversational prompt/completion rows, its default completion-only loss). TRL uses its defaults
otherwise (batch 8, padding, no packing); slmtune its defaults (packing short examples) with the
same 8 examples per optimizer step (`train.examples_per_step: 8`, packed into rows). Each
trainer runs in its own process, so peak RSS is its own. Both adapters are then scored by the
same function on the same validation conversations, so the losses are comparable.

`--levers` adds a second table: slmtune's levers (bf16 frozen base, per-example attention of packed
rows, rows per forward pass, packing, bf16 autocast, gradient checkpointing, fused cross-entropy,
adapter inputs left in bf16, threads, QLoRA) switched one at a time on `--lever-rows` rows, with
tokens/s, peak RSS and the validation loss of each.

Run with the machine otherwise idle: on 2 cores a busy neighbour can slow PyTorch several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHAT = REPO.parent / "shared" / "data" / "chat"
LR, RANK, ALPHA, MAX_LENGTH = 2e-4, 16, 32, 1024


def first_rows(path: Path, n: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# slmtune's configuration for the TRL comparison (its defaults, with TRL's 8 examples per step),
# and the levers of issue #7 as variations of it: recipe sections to override.
VARIANTS = {
    "slmtune": {},
    "fp32 frozen base": {"model": {"frozen_dtype": "float32"}},
    "masked attention": {"model": {"attn_implementation": "sdpa_mask"}},
    "2 rows/forward": {"train": {"micro_batch_size": 2}},
    "no packing": {"train": {"packing": False, "micro_batch_size": 8}},
    "fp32": {"train": {"precision": "fp32"}},
    "grad ckpt": {"train": {"gradient_checkpointing": True}},
    "plain CE": {"train": {"cross_entropy": "plain"}},
    "PEFT input cast": {"peft_input_upcast": True},
    "1 thread": {"train": {"num_threads": 1}},
    "qlora": {"method": {"name": "qlora"}},
    "qlora+ckpt": {"method": {"name": "qlora"}, "train": {"gradient_checkpointing": True}},
}


def worker_slmtune(model: str, train_file: str, out: Path, variant: str = "slmtune") -> dict:
    from slmtune.config import recipe_from_dict
    from slmtune.training.run import run

    overrides = VARIANTS[variant]
    if overrides.get("peft_input_upcast"):
        # PEFT's own behaviour, for comparison: adapter inputs cast to fp32 (and back by autocast).
        import slmtune.training.run

        slmtune.training.run.skip_adapter_input_upcast = lambda model: None
    recipe = recipe_from_dict({
        "model": {"name": model, **overrides.get("model", {})},
        "method": {"name": "lora", "lora_r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
                   **overrides.get("method", {})},
        # validation_split 0: train on every row, as TRL does (the "auto" default holds 10% out).
        "data": {"train": train_file, "max_length": MAX_LENGTH, "validation_split": 0},
        # TRL's default batch is 8 examples per optimizer step; slmtune packs those 8 into rows.
        "train": {"epochs": 1, "examples_per_step": 8, "learning_rate": LR,
                  "schedule": "linear", "warmup_ratio": 0.0, "seed": 42, **overrides.get("train", {})},
        "output": {"dir": str(out / "run"), "overwrite": True},
    })
    result = run(recipe, progress=False)
    s = result.summary
    return {"adapter": str(result.run_dir / "adapter"), "tokens": s["train_tokens"], "seconds": s["train_seconds"],
            "steps": s["steps"], "examples": s["train_examples"], "peak_rss_mb": peak_rss_mb()}


def worker_trl(model: str, train_file: str, out: Path) -> dict:
    import peft
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = load_dataset("json", data_files=train_file, split="train")
    rows = rows.map(lambda r: {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]},
                    remove_columns=["messages"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype="float32")
    config = SFTConfig(output_dir=str(out / "trl"), num_train_epochs=1, learning_rate=LR,
                       lr_scheduler_type="linear", warmup_steps=0, max_length=MAX_LENGTH, bf16=True,
                       use_cpu=True, save_strategy="no", report_to=[], logging_steps=10, seed=42)
    trainer = SFTTrainer(model=net, args=config, train_dataset=rows, processing_class=tokenizer,
                         peft_config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.model.save_pretrained(out / "trl-adapter")
    return {"adapter": str(out / "trl-adapter"), "tokens": tokens, "seconds": seconds,
            "steps": trainer.state.global_step, "examples": len(rows), "peak_rss_mb": peak_rss_mb()}


def worker_eval(model: str, adapters: list[str], validation_file: str) -> dict:
    """Validation loss of each adapter on assistant tokens, by slmtune's own (target-only) loss."""
    from peft import PeftModel

    from slmtune.config import DataSection
    from slmtune.data.dataset import build_datasets
    from slmtune.data.batching import collate
    from slmtune.models import load_model, load_tokenizer
    from slmtune.training.loss import TargetLoss

    tokenizer = load_tokenizer(model)
    data = build_datasets(DataSection(train=validation_file, max_length=MAX_LENGTH), tokenizer, 0)
    batches = [collate([[e] for e in data.train[i:i + 8]], tokenizer.pad_token_id, False)
               for i in range(0, len(data.train), 8)]
    import torch

    losses = {}
    for adapter in adapters:
        loss = TargetLoss(PeftModel.from_pretrained(load_model(model), adapter).eval())
        with torch.no_grad():  # mean over target tokens, as the loop's evaluation
            total = sum(loss(batch, torch.bfloat16).item() for batch in batches)
        losses[adapter] = total / max(1, sum(batch["n_targets"] for batch in batches))
    return losses


def matmul_gflops(dtype_name: str, sizes=(1024, 2048), trials: int = 5, repeats: int = 5) -> list[float]:
    """GFLOP/s of square matmuls, one figure per (trial, size): the best of them is the machine's
    peak. A shared 2-core machine's throughput drifts (2-3x between minutes has been seen here), so
    one timing would make the peak, and so the MFU, depend on the moment it was taken."""
    import torch

    dtype = getattr(torch, dtype_name)
    found = []
    for _ in range(trials):
        for size in sizes:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            found.append(2 * size**3 * repeats / (time.perf_counter() - started) / 1e9)
    return found


def model_matmul_gflops(model_dir: str, tokens: int, repeats: int = 5, trials: int = 3) -> float:
    """bf16 GFLOP/s of the model's own matmuls on one `tokens`-row forward pass: each decoder layer's
    projections (x @ W.T) and their input gradients (dy @ W), the shapes a LoRA step multiplies. The
    square 2048 matmul of `matmul_gflops` is the machine's peak; this is the best the model's shapes
    allow, an upper bound on the MFU any trainer can reach with it here (best of `trials`)."""
    import torch

    from slmtune.training.plan import architecture

    arch = architecture(model_dir)
    h, kv, i = arch.hidden_size, arch.num_key_value_heads * arch.head_dim, arch.intermediate_size
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down: (out, in)
    weights = [torch.randn(out, inp, dtype=torch.bfloat16) for out, inp in shapes]
    x = {inp: torch.randn(tokens, inp, dtype=torch.bfloat16) for _, inp in shapes}
    dy = {out: torch.randn(tokens, out, dtype=torch.bfloat16) for out, _ in shapes}

    def layer():
        for w in weights:
            x[w.shape[1]] @ w.T
            dy[w.shape[0]] @ w

    layer()
    flops, best = 2 * 2 * tokens * sum(out * inp for out, inp in shapes) * repeats, 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            layer()
        best = max(best, flops / (time.perf_counter() - started) / 1e9)
    return best


def lora_step_flops_per_token(model_dir: str, target_fraction: float) -> float:
    """Forward 2N, backward ~2N (activation gradients through frozen weights; no weight gradients
    except the small adapters), per token; the LM head only at target positions."""
    from slmtune.training.plan import architecture

    arch = architecture(model_dir)
    body = arch.num_hidden_layers * arch.linear_params_per_layer()
    head = arch.vocab_size * arch.hidden_size
    return 4 * body + 4 * head * target_fraction


def target_fraction(model_dir: str, tmp: Path) -> float:
    """Share of the training tokens that are assistant (target) tokens: the LM head runs only there."""
    from slmtune.config import DataSection
    from slmtune.data.dataset import build_datasets
    from slmtune.models import load_tokenizer

    examples = build_datasets(DataSection(train=str(tmp / "train.jsonl"), max_length=MAX_LENGTH),
                              load_tokenizer(model_dir), 0).train
    return sum(e.n_targets(MAX_LENGTH) for e in examples) / sum(min(len(e), MAX_LENGTH) for e in examples)


def run_worker(kind: str, args, tmp: Path, extra: list[str]) -> dict:
    # Offline: no hub look-ups (model cards, telemetry) that would stall on a closed network.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--threads", str(args.threads),
           "--tmp", str(tmp), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--validation-rows", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="train each trainer this many times, alternating; the table keeps each one's fastest run")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--worker")
    parser.add_argument("--tmp")
    parser.add_argument("--adapters", nargs="*")
    parser.add_argument("--variant", default="slmtune", choices=list(VARIANTS))
    parser.add_argument("--levers", action="store_true",
                        help="also train every slmtune variant (VARIANTS) on --lever-rows rows: a second table")
    parser.add_argument("--lever-rows", type=int, default=120)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        from slmtune.models import resolve

        model, tmp = resolve(args.model), Path(args.tmp)
        if args.worker == "eval":
            print(json.dumps(worker_eval(model, args.adapters, str(tmp / "validation.jsonl"))))
        else:
            train_file = str(tmp / ("train.jsonl" if args.worker != "lever" else "lever.jsonl"))
            if args.worker == "trl":
                print(json.dumps(worker_trl(model, train_file, tmp)))
            else:
                out = tmp / (args.worker + "-" + args.variant.replace(" ", "_"))
                print(json.dumps(worker_slmtune(model, train_file, out, args.variant)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="slmtune-bench-"))
    for name, n, source in (("train", args.rows, "train"), ("validation", args.validation_rows, "validation"),
                            ("lever", args.lever_rows, "train")):
        rows = first_rows(CHAT / f"{source}.jsonl", n)
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bf16_trials = matmul_gflops("bfloat16")
    runs = {"slmtune": [], "trl": []}
    for repeat in range(args.repeats):
        for kind in runs:  # slmtune first: a broken configuration fails in minutes, not after TRL
            print(f"training with {kind} ({repeat + 1}/{args.repeats})...", file=sys.stderr, flush=True)
            runs[kind].append(run_worker(kind, args, tmp, []))
    # Each trainer's fastest repeat: the machine's drift only ever slows a run down. Training is
    # seeded, so every repeat trains the same adapter; the last one's is scored.
    results = {kind: max(found, key=lambda r: r["tokens"] / r["seconds"]) for kind, found in runs.items()}
    for kind, found in runs.items():
        results[kind]["adapter"] = found[-1]["adapter"]
    losses = run_worker("eval", args, tmp, ["--adapters", results["trl"]["adapter"], results["slmtune"]["adapter"]])
    for kind in results:
        results[kind]["eval_loss"] = losses[results[kind]["adapter"]]

    from slmtune.models import resolve

    bf16_trials += matmul_gflops("bfloat16")  # before and after training, to span the drift
    peak_bf16, peak_fp32 = max(bf16_trials), max(matmul_gflops("float32", trials=2))
    flops_per_token = lora_step_flops_per_token(resolve(args.model), target_fraction(resolve(args.model), tmp))
    print(f"\nSmolLM2-135M-Instruct, LoRA r={RANK}, {args.rows} chat rows, 1 epoch, {args.threads} threads; "
          f"machine: bf16 matmul {peak_bf16:.0f} GFLOP/s (best of {len(bf16_trials)} timings, the worst "
          f"{min(bf16_trials):.0f}), fp32 {peak_fp32:.0f} GFLOP/s")
    if args.repeats > 1:
        print("tokens/s of every repeat: " + "; ".join(
            f"{kind} " + ", ".join(f"{r['tokens'] / r['seconds']:.1f}" for r in found) for kind, found in runs.items()))
    print(f"{'trainer':8} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'steps':>6} {'ex/step':>7} "
          f"{'peak RSS MB':>11} {'eval loss':>9} {'MFU bf16':>8}")
    for kind, r in results.items():
        tps = r["tokens"] / r["seconds"]
        mfu = tps * flops_per_token / (peak_bf16 * 1e9)
        print(f"{kind:8} {r['tokens']:>8} {r['seconds']:>8.1f} {tps:>9.1f} {r['steps']:>6} "
              f"{r['examples'] / r['steps']:>7.1f} {r['peak_rss_mb']:>11.0f} {r['eval_loss']:>9.4f} {100 * mfu:>7.1f}%")
    s, t = results["slmtune"], results["trl"]
    shapes_gflops = model_matmul_gflops(resolve(args.model), MAX_LENGTH)
    print(f"the model's own matmul shapes ({MAX_LENGTH}-token rows, forward and input gradients) run at "
          f"{shapes_gflops:.0f} GFLOP/s: {100 * shapes_gflops / peak_bf16:.0f}% of the bf16 peak, the MFU ceiling here")
    print(f"ratios slmtune/TRL: tokens/s {(s['tokens'] / s['seconds']) / (t['tokens'] / t['seconds']):.2f}x, "
          f"peak RSS {s['peak_rss_mb'] / t['peak_rss_mb']:.2f}x, eval loss {s['eval_loss'] / t['eval_loss']:.3f}x")
    if args.levers:
        levers(args, tmp)


def levers(args, tmp: Path) -> None:
    """Each lever as a variation of slmtune's configuration, same rows, same scorer, one table."""
    results = {}
    for variant in VARIANTS:
        print(f"lever: {variant}...", file=sys.stderr, flush=True)
        results[variant] = run_worker("lever", args, tmp, ["--variant", variant])
    losses = run_worker("eval", args, tmp, ["--adapters", *(r["adapter"] for r in results.values())])
    base = results["slmtune"]
    print(f"\nLevers: slmtune variants on the first {args.lever_rows} chat rows, 1 epoch, 8 examples per step, "
          f"{args.threads} threads unless stated")
    print(f"{'variant':16} {'tokens/s':>9} {'vs default':>10} {'peak RSS MB':>11} {'vs default':>10} {'eval loss':>9}")
    for variant, r in results.items():
        tps, base_tps = r["tokens"] / r["seconds"], base["tokens"] / base["seconds"]
        print(f"{variant:16} {tps:>9.1f} {tps / base_tps:>9.2f}x {r['peak_rss_mb']:>11.0f} "
              f"{r['peak_rss_mb'] / base['peak_rss_mb']:>9.2f}x {losses[r['adapter']]:>9.4f}")


if __name__ == "__main__":
    main()
