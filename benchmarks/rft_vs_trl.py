"""Reinforcement fine-tuning (GRPO) next to TRL's GRPOTrainer, side by side in one run.

    pip install -e '.[bench]'                     # TRL 1.16
    python benchmarks/rft_vs_trl.py --steps 24 --threads 2

One configuration for both: SmolLM2-135M-Instruct, LoRA r=16 (alpha 32, every linear layer, no
dropout), learning rate 2e-4, the 240 extraction prompts of examples/rft/train.jsonl graded by
examples/rft/grader.json (0.5 for an answer containing the value, 0.5 more for exactly the value),
8 answers to each of 4 prompts per optimizer step (32 completions), at most 16 tokens each,
temperature 1.0, no KL (beta 0), token-level loss normalisation, rewards scaled by the group's std
(TRL's defaults: loss_type dapo, scale_rewards group), `--steps` steps. TRL's reward function calls
the same grader (slmtune.graders.grade). Each trainer runs in its own process (so peak RSS is its
own); repeats alternate the order, since a CPU's speed drifts within minutes.

Columns: seconds per optimizer step (all of it: sampling, grading, training), generated answer
tokens per second and trained tokens (prompt + answer) per second over the whole step, peak RSS,
mean reward over the first and the last 5 steps, and the ratios slmtune / TRL of the same repeat.
Precision: each at its own default on this machine (printed): slmtune autocasts to bf16 where the
CPU has native bf16, TRL trains in fp32 on a CPU unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "examples" / "rft" / "train.jsonl"
GRADER = REPO / "examples" / "rft" / "grader.json"
MODEL = "smollm2-135m-instruct"
GROUP, PROMPTS_PER_STEP, MAX_TOKENS, LEARNING_RATE, SEED = 8, 4, 16, 2e-4, 42
EDGE = 5  # steps averaged for the first / last reward


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(steps: int, threads: int, out: Path) -> dict:
    """slmtune's GRPO objective through run(recipe), as `slmtune train` runs it."""
    from slmtune.config import recipe_from_dict
    from slmtune.training import events
    from slmtune.training.run import run

    recipe = recipe_from_dict({
        "model": {"name": MODEL},
        "method": {"name": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "data": {"train": str(PROMPTS), "validation_split": 0, "max_length": 512},
        "train": {"objective": {"name": "grpo", "grader": str(GRADER), "num_generations": GROUP,
                                "prompts_per_step": PROMPTS_PER_STEP, "max_completion_tokens": MAX_TOKENS},
                  "max_steps": steps, "learning_rate": LEARNING_RATE, "warmup_ratio": 0.0, "schedule": "linear",
                  "seed": SEED, "num_threads": threads, "eval_every": 0},
        "output": {"dir": str(out / "ours"), "overwrite": True},
    })
    step_events: list[events.Step] = []
    result = run(recipe, progress=False, on_event=lambda e: step_events.append(e) if isinstance(e, events.Step) else None)
    s = result.summary
    return {"seconds": s["train_seconds"], "steps": s["steps"], "trained_tokens": s["train_tokens"],
            "generated_tokens": sum(e.metrics["completion_length"] * GROUP * PROMPTS_PER_STEP for e in step_events),
            "rewards": [e.metrics["reward"] for e in step_events], "peak_rss_mb": peak_rss_mb(),
            "precision": "bf16 autocast" if _bf16() else "fp32"}


def _bf16() -> bool:
    import torch

    from slmtune.training.loss import autocast_dtype
    return autocast_dtype("auto", torch.device("cpu")) is not None


def trl(steps: int, threads: int, out: Path) -> dict:
    """TRL's GRPOTrainer with its defaults but for the shared settings above."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from slmtune import models
    from slmtune.graders import grade

    torch.set_num_threads(threads)
    grader = json.loads(GRADER.read_text())
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"], "field": r["field"]} for r in rows])

    def reward(prompts, completions, answer, field, **kwargs) -> list[float]:
        return [grade(grader, c[-1]["content"], {"answer": a, "field": f}).reward
                for c, a, f in zip(completions, answer, field)]

    path = str(models.pull(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = GRPOConfig(output_dir=str(out / "trl"), max_steps=steps, learning_rate=LEARNING_RATE,
                        per_device_train_batch_size=GROUP * PROMPTS_PER_STEP, gradient_accumulation_steps=1,
                        num_generations=GROUP, max_completion_length=MAX_TOKENS, temperature=1.0, beta=0.0,
                        lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no",
                        report_to="none", seed=SEED, use_cpu=True, disable_tqdm=True)
    timings: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timings.append(time.perf_counter() - self.started)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"),
                          callbacks=[StepTimer()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    n = GROUP * PROMPTS_PER_STEP
    generated = sum(entry["completions/mean_length"] * n for entry in logs)
    prompt_tokens = sum(len(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
                        for r in rows) / len(rows) * n * len(logs)  # the mean prompt: TRL's order is its own
    return {"seconds": sum(timings), "steps": len(timings), "trained_tokens": prompt_tokens + generated,
            "generated_tokens": generated, "rewards": [entry["reward"] for entry in logs],
            "peak_rss_mb": peak_rss_mb(), "precision": "fp32" if not config.bf16 else "bf16"}


SIDES = {"slmtune": ours, "trl": trl}


def run_side(side: str, steps: int, threads: int, out: Path) -> dict:
    """One trainer in its own process; its measurements as JSON."""
    result = out / f"{side}.json"
    subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(steps), "--threads", str(threads),
                    "--out", str(out)], check=True, env=os.environ | {"TQDM_DISABLE": "1"})
    return json.loads(result.read_text())


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--out", default="runs/bench-rft")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.side:
        result = SIDES[args.side](args.steps, args.threads, out)
        (out / f"{args.side}.json").write_text(json.dumps(result))
        return

    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads; "
          f"{MODEL}, LoRA r16, {PROMPTS_PER_STEP} prompts x {GROUP} answers of <= {MAX_TOKENS} tokens per step, "
          f"{args.steps} steps")
    header = (f"{'repeat':>6} {'trainer':>8} {'precision':>14} {'s/step':>7} {'gen tok/s':>9} {'train tok/s':>11} "
              f"{'peak RSS MB':>11} {'reward first':>12} {'reward last':>11}")
    print(header)
    ratios = []
    for repeat in range(args.repeats):
        order = list(SIDES) if repeat % 2 else list(SIDES)[::-1]  # TRL first in the first repeat
        results = {side: run_side(side, args.steps, args.threads, out) for side in order}
        for side in SIDES:
            r = results[side]
            print(f"{repeat + 1:>6} {side:>8} {r['precision']:>14} {r['seconds'] / r['steps']:>7.2f} "
                  f"{r['generated_tokens'] / r['seconds']:>9.1f} {r['trained_tokens'] / r['seconds']:>11.1f} "
                  f"{r['peak_rss_mb']:>11.0f} {mean(r['rewards'][:EDGE]):>12.3f} {mean(r['rewards'][-EDGE:]):>11.3f}")
        a, b = results["slmtune"], results["trl"]
        ratios.append(((b["seconds"] / b["steps"]) / (a["seconds"] / a["steps"]), a["peak_rss_mb"] / b["peak_rss_mb"],
                       mean(a["rewards"][-EDGE:]) - mean(b["rewards"][-EDGE:])))
    for repeat, (speed, rss, reward) in enumerate(ratios, 1):
        print(f"repeat {repeat}: slmtune steps/s = {speed:.2f}x TRL's, peak RSS = {rss:.2f}x TRL's, "
              f"last reward {reward:+.3f} vs TRL")


if __name__ == "__main__":
    main()
