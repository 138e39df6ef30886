"""Preference tuning's cost next to supervised fine-tuning's, side by side in one run.

    python benchmarks/preference.py --steps 8 --repeats 2 --threads 2

The same 120 questions of examples/preference/train.jsonl: SFT on the preferred answers (a chat
file made from the pairs), DPO and ORPO on the pairs; LoRA r=16 on SmolLM2-135M-Instruct, 16
examples (pairs) per optimizer step, `--steps` steps. Each run is its own `slmtune train` process
(so peak RSS is its own); repeats alternate the objectives, since a CPU's speed drifts within
minutes. A DPO step scores both answers of every pair with the policy and, adapter disabled, with
the reference (no gradient), so per pair it does about 2x SFT's forward-backward plus 2 forward
passes; ORPO needs no reference.

Columns: tokens/s of every repeat (all tokens of a step's rows: prompt and answers), pairs (or
examples) per second, peak RSS, and the ratios against SFT in the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "examples" / "preference" / "train.jsonl"
OBJECTIVES = ("sft", "dpo", "orpo")


def sft_file(folder: Path) -> Path:
    """The preferred answers as chat examples: what SFT would train on."""
    path = folder / "sft.jsonl"
    with PAIRS.open() as f, path.open("w") as out:
        for line in f:
            pair = json.loads(line)
            out.write(json.dumps({"messages": pair["input"]["messages"] + pair["preferred_output"]}) + "\n")
    return path


def train(objective: str, data: Path, out: Path, steps: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "slmtune.cli", "train", "--model", "smollm2-135m-instruct", "--data", str(data),
           "--output", str(out), "--no-progress", f"train.max_steps={steps}", "train.examples_per_step=16",
           f"train.num_threads={threads}", "method.lora_r=16", "method.lora_alpha=32", "method.lora_dropout=0.0",
           "train.learning_rate=5e-4", "data.validation_split=0"]
    if objective != "sft":
        cmd += ["--objective", objective]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ | {"TQDM_DISABLE": "1"})
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {o: [] for o in OBJECTIVES}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sft = sft_file(folder)
        for repeat in range(args.repeats):
            order = OBJECTIVES if repeat % 2 == 0 else OBJECTIVES[::-1]
            for objective in order:
                data = sft if objective == "sft" else PAIRS
                runs[objective].append(train(objective, data, folder / f"{objective}-{repeat}", args.steps,
                                             args.threads))
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads; {args.steps} steps of "
          f"16 examples/pairs, {args.repeats} repeats alternating")
    print(f"{'objective':<10}{'tokens/s (each repeat)':<28}{'examples/s':>11}{'peak RSS MB':>13}"
          f"{'tok/s vs sft':>14}{'ex/s vs sft':>13}{'RSS vs sft':>12}")
    sft_runs = runs["sft"]
    for objective in OBJECTIVES:
        rows = runs[objective]
        tps = [r["tokens_per_second"] for r in rows]
        eps = [16 * r["steps"] / r["train_seconds"] for r in rows]
        rss = max(r["peak_rss_mb"] for r in rows)
        # Ratios per repeat (measured side by side), then their mean.
        tps_ratio = sum(r["tokens_per_second"] / s["tokens_per_second"] for r, s in zip(rows, sft_runs)) / len(rows)
        eps_ratio = sum((s["train_seconds"] / r["train_seconds"]) for r, s in zip(rows, sft_runs)) / len(rows)
        rss_ratio = rss / max(s["peak_rss_mb"] for s in sft_runs)
        print(f"{objective:<10}{', '.join(f'{t:.1f}' for t in tps):<28}{sum(eps) / len(eps):>11.2f}{rss:>13.0f}"
              f"{tps_ratio:>13.2f}x{eps_ratio:>12.2f}x{rss_ratio:>11.2f}x")


if __name__ == "__main__":
    main()
