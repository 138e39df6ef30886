"""The sweep behind the "auto" rule (slmtune/auto.py): a grid of epochs x learning rate per method
on datasets of different sizes and kinds, each cell scored on its held-out test split with the task
metric; per dataset the best cell, the cell the rule picks, and the gap.

    python benchmarks/auto_sweep.py                               # the whole grid (hours on 2 cores)
    python benchmarks/auto_sweep.py --datasets intents facts --methods lora --epochs 1 3 --rates 1e-3

Datasets (real SmolLM2-135M-Instruct; every cell is a `slmtune train` process with the dataset's
data section and the cell's epochs / learning rate, then `slmtune eval` on the test split):
    facts     examples/support_assistant: 75 chat conversations of product facts; facts right on
              15 paraphrased questions (examples/support_assistant/compare.py)
    intents   examples/intents: 8 support intents, 288 rows; accuracy on 96 rows phrased differently
    spam      ../shared/data/classification (2 labels): a 300-row sample; accuracy on 300 test rows
    qa        ../shared/data/qa (extractive): a 300-row sample; F1 on 150 test rows
    ner       ../shared/data/ner: a 300-row sample; F1 on 150 test rows
The "auto" cell is the run with epochs and learning rate left to the rule. Repeating the grid on a
machine of its own is the way to check the rule; docs/benchmarks.md ("The auto rule") holds the
cells measured so far and says which were not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


@dataclass
class Dataset:
    name: str
    train: Path
    test: Path
    task: str | None  # None: a chat file scored by the facts check
    metric: str
    max_examples: int | None = None
    test_limit: int | None = None
    max_length: int = 256


DATASETS = {
    "facts": Dataset("facts", REPO / "examples/support_assistant/train.jsonl",
                     REPO / "examples/support_assistant/heldout.jsonl", None, "facts"),
    "intents": Dataset("intents", REPO / "examples/intents/train.jsonl", REPO / "examples/intents/test.jsonl",
                       "classification", "accuracy"),
    "spam": Dataset("spam", SHARED / "classification/train.jsonl", SHARED / "classification/test.jsonl",
                    "classification", "accuracy", 300, 300),
    "qa": Dataset("qa", SHARED / "qa/train.jsonl", SHARED / "qa/test.jsonl", "qa", "f1", 300, 150, 512),
    "ner": Dataset("ner", SHARED / "ner/train.jsonl", SHARED / "ner/test.jsonl", "ner", "f1", 300, 150),
}
GRID = {"lora": {"epochs": [1, 3, 6], "rates": [3e-4, 1e-3, 3e-3]},
        "full": {"epochs": [1, 3], "rates": [2e-5, 5e-5, 1e-4]}}


def facts_score(run_dir: Path) -> float:
    spec = importlib.util.spec_from_file_location("compare", REPO / "examples/support_assistant/compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    right = compare.score(str(run_dir), echo=lambda line: None)
    return right["fine-tuned"] / right["questions"]


def cell(ds: Dataset, method: str, epochs, rate, out: Path, threads: int) -> tuple[float, dict]:
    """Train one cell and score it; returns (metric, summary)."""
    cmd = [sys.executable, "-m", "slmtune.cli", "train", "--model", "smollm2-135m-instruct", "--data", str(ds.train),
           "--method", method, "--output", str(out), "--no-progress", f"data.max_length={ds.max_length}",
           f"train.epochs={epochs}", f"train.learning_rate={rate}", "train.examples_per_step=16",
           f"train.num_threads={threads}", "train.seed=42"]
    cmd += [f"data.task={ds.task}"] if ds.task else []
    cmd += [f"data.max_examples={ds.max_examples}"] if ds.max_examples else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO, env=os.environ | {"TQDM_DISABLE": "1"})
    summary = json.loads((out / "summary.json").read_text())
    if ds.task is None:
        return facts_score(out), summary
    cmd = [sys.executable, "-m", "slmtune.cli", "eval", str(out), "--data", str(ds.test)]
    cmd += ["--limit", str(ds.test_limit)] if ds.test_limit else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO, env=os.environ | {"TQDM_DISABLE": "1"})
    report = json.loads((out / "eval.json").read_text())
    return float(report["metrics"][ds.metric]), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--epochs", nargs="+", type=float, help="override the grid's epochs")
    parser.add_argument("--rates", nargs="+", type=float, help="override the grid's learning rates")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{'dataset':<9}{'method':<7}{'cell':<22}{'metric':>8}{'steps':>7}{'seconds':>9}", flush=True)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            ds = DATASETS[name]
            for method in args.methods:
                grid = GRID[method]
                cells = [(e, r) for e in (args.epochs or grid["epochs"]) for r in (args.rates or grid["rates"])]
                scores = {}
                for epochs, rate in cells + [("auto", "auto")]:
                    out = Path(tmp) / f"{name}-{method}-{epochs}-{rate}"
                    value, summary = cell(ds, method, epochs, rate, out, args.threads)
                    label = "auto" if epochs == "auto" else f"{epochs:g} ep x {rate:g}"
                    if epochs == "auto":
                        recipe = (out / "recipe.yaml").read_text()
                        picked = [line.strip() for line in recipe.splitlines()
                                  if line.strip().startswith(("epochs:", "learning_rate:"))]
                        label = "auto (" + ", ".join(p.split(": ")[1] for p in picked) + ")"
                    scores[label] = value
                    print(f"{name:<9}{method:<7}{label:<22}{value:>8.3f}{summary['steps']:>7}"
                          f"{summary['wall_seconds']:>9.0f}", flush=True)
                best = max((k for k in scores if not k.startswith("auto")), key=scores.get)
                rule = next(k for k in scores if k.startswith("auto"))
                table.append((name, method, best, scores[best], rule, scores[rule]))
    print(f"\n{'dataset':<9}{'method':<7}{'best cell':<18}{'best':>7}  {'rule picks':<26}{'rule':>7}{'gap':>8}")
    for name, method, best, best_value, rule, rule_value in table:
        print(f"{name:<9}{method:<7}{best:<18}{best_value:>7.3f}  {rule:<26}{rule_value:>7.3f}"
              f"{rule_value - best_value:>+8.3f}")


if __name__ == "__main__":
    main()
