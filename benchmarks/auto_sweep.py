"""The sweep behind the "auto" rule (slmtune/auto.py): a grid of epochs x learning rate per method on
datasets of different sizes and kinds, each cell scored on its held-out test split with the task's
metric; per dataset the best cell, the cell the rule picks, and the gap.

    python benchmarks/auto_sweep.py                                 # the whole grid (hours on 2 cores)
    python benchmarks/auto_sweep.py --datasets intents --methods lora --epochs 3 6 --rates 3e-4 1e-3
    python benchmarks/auto_sweep.py --datasets intents --methods full --no-grid   # the rule's cell alone
    python benchmarks/auto_sweep.py --table-only                    # the table of every cell measured so far

Every cell is a `slmtune train` process (SmolLM2-135M-Instruct, the dataset's data section, the
cell's epochs and learning rate, everything else the defaults: held-out validation, best checkpoint)
and then `slmtune eval` on the test split (facts: the held-out questions, answered greedily). Cells
are appended to --results (JSON lines) as they finish, so the grid can be run in pieces, on several
days, and a cell already in the file is not trained again; the table is computed from the file.

Datasets:
    facts     examples/product_facts: 75 chat conversations (25 facts x 3); facts right on 25
              paraphrased questions
    intents   examples/intents: 8 support intents, 288 rows; accuracy on 96 rows phrased differently
    spam      ../shared/data/classification (2 labels): a 500-row sample; macro-F1 on 300 test rows
    qa        ../shared/data/qa (extractive): a 300-row sample; F1 on 150 test rows
    ner       ../shared/data/ner: a 300-row sample; F1 on 150 test rows
    tools     examples/tools: 150 conversations calling 3 functions; exact calls on 60 test rows
The "auto" cell is the run with epochs and learning rate left to the rule. The rule's cell in the table
is the measured cell (auto or grid, same seed) at the values the rule resolves *now* for the dataset
(rule_values: the same build_datasets and resolved_for_data as `slmtune train`), so a cell measured
under an earlier rule (epochs, rate or step size) is not taken for the current one's; an auto cell is trained again when the rule
has moved. The target: the rule within
2 points (or 5% relative) of the best cell on every dataset. docs/benchmarks.md ("The auto rule") holds
the cells measured and says which were not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slmtune.chat import generate_reply
from slmtune.config import recipe_from_dict
from slmtune.data.dataset import build_datasets
from slmtune.models import load_tokenizer
from slmtune.scoring import states_fact
from slmtune.tasks import TASKS
from slmtune.training.rundir import RunDir, load_for_inference

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


@dataclass
class Dataset:
    name: str
    train: Path
    test: Path
    task: str | None  # None: a chat file scored by its held-out questions (facts)
    max_examples: int | None = None
    test_limit: int | None = None
    max_length: int = 256

    @property
    def metric(self) -> str:
        return "facts" if self.task is None else TASKS[self.task].METRIC


DATASETS = {
    "facts": Dataset("facts", REPO / "examples/product_facts/train.jsonl",
                     REPO / "examples/product_facts/heldout.jsonl", None),
    "intents": Dataset("intents", REPO / "examples/intents/train.jsonl", REPO / "examples/intents/test.jsonl",
                       "classification"),
    "spam": Dataset("spam", SHARED / "classification/train.jsonl", SHARED / "classification/test.jsonl",
                    "classification", 500, 300),
    "qa": Dataset("qa", SHARED / "qa/train.jsonl", SHARED / "qa/test.jsonl", "qa", 300, 150, 512),
    "ner": Dataset("ner", SHARED / "ner/train.jsonl", SHARED / "ner/test.jsonl", "ner", 300, 150),
    "tools": Dataset("tools", REPO / "examples/tools/train.jsonl", REPO / "examples/tools/test.jsonl", "tools",
                     max_length=512),
}
MODEL, SEED = "smollm2-135m-instruct", 42
GRID = {"lora": {"epochs": [1, 3, 6], "rates": [3e-4, 1e-3, 3e-3]},
        "full": {"epochs": [1, 3], "rates": [2e-5, 5e-5, 1e-4]}}
DEFAULT_RESULTS = REPO / "docs" / "results" / "auto_sweep.jsonl"


def facts_score(run_dir: Path, heldout: Path) -> float:
    """Share of held-out questions whose greedy answer contains the expected fact (case-insensitive)."""
    system = json.loads(heldout.with_name("train.jsonl").open().readline())["messages"][0]["content"]
    model, tokenizer = load_for_inference(str(run_dir))
    questions = [json.loads(line) for line in heldout.open()]
    right = 0
    for item in questions:
        answer = generate_reply(model, tokenizer, [{"role": "system", "content": system},
                                                   {"role": "user", "content": item["question"]}], max_new_tokens=60)
        right += states_fact(answer, item["answer_contains"])
    return right / len(questions)


def data_section(ds: Dataset) -> dict:
    """The recipe's data section of a cell (cell() passes the same values as overrides)."""
    return ({"train": str(ds.train), "max_length": ds.max_length} | ({"task": ds.task} if ds.task else {})
            | ({"max_examples": ds.max_examples} if ds.max_examples else {}))


def rule_values(ds: Dataset, method: str, tokenizer) -> tuple[float, float, int | None]:
    """(epochs, learning rate, examples per step) the rule resolves today for a cell of `ds` and
    `method`: what run() does."""
    recipe = recipe_from_dict({"model": MODEL, "method": {"name": method}, "data": data_section(ds),
                               "train": {"seed": SEED}, "output": {"dir": "unused"}})
    data = build_datasets(recipe.data, tokenizer, SEED)
    train = recipe.train.resolved_for_data(data.n_examples, method, data.n_target_tokens, data.held_out)
    return float(train.epochs), float(train.learning_rate), train.examples_per_step


# Cells measured before rows recorded their step size all stepped every 4 examples (auto.batch_size
# of 75-500 examples under the earlier SMALL_BATCH_BELOW = 32).
EARLIER_EXAMPLES_PER_STEP = 4


def cell_values(r: dict) -> tuple[float, float, int | None]:
    """A measured cell's (epochs, learning rate, examples per step), comparable with rule_values."""
    return float(r["epochs"]), float(r["learning_rate"]), r.get("examples_per_step", EARLIER_EXAMPLES_PER_STEP)


def cell(ds: Dataset, method: str, epochs, rate, out: Path, threads: int) -> tuple[float, dict, dict]:
    """Train one cell and score it; returns (metric, summary, the run's resolved train section)."""
    quiet = dict(check=True, stdout=subprocess.DEVNULL, cwd=REPO, env=os.environ | {"TQDM_DISABLE": "1"})
    cmd = [sys.executable, "-m", "slmtune.cli", "train", "--model", MODEL, "--data", str(ds.train),
           "--method", method, "--output", str(out), "--no-progress", f"data.max_length={ds.max_length}",
           f"train.epochs={epochs}", f"train.learning_rate={rate}", f"train.num_threads={threads}",
           f"train.seed={SEED}"]
    cmd += [f"data.task={ds.task}"] if ds.task else []
    cmd += [f"data.max_examples={ds.max_examples}"] if ds.max_examples else []
    subprocess.run(cmd, **quiet)
    run_dir = RunDir(out)
    summary, train = run_dir.summary(), run_dir.recipe().train
    if ds.task is None:
        return facts_score(out, ds.test), summary, train
    cmd = [sys.executable, "-m", "slmtune.cli", "eval", str(out), "--data", str(ds.test), "--no-progress"]
    cmd += ["--limit", str(ds.test_limit)] if ds.test_limit else []
    subprocess.run(cmd, **quiet)
    report = json.loads((out / "eval.json").read_text())
    return float(report["metrics"][ds.metric]), summary, train


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def print_table(results: list[dict], rules: dict[tuple, tuple[float, float, int | None]]) -> None:
    """Per (dataset, method): every cell, then the best cell, the rule's cell (the cell at `rules`'
    values: (dataset, method) -> the rule's epochs, learning rate and step size today) and the gap."""
    print(f"{'dataset':<9}{'method':<7}{'cell':<26}{'metric':>8}{'steps':>7}{'best step':>10}{'seconds':>9}")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)
    summary = []
    for (name, method), cells in groups.items():
        for r in cells:
            print(f"{name:<9}{method:<7}{label(r):<26}{r['score']:>8.3f}{r['steps']:>7}{r['result_step']:>10}"
                  f"{r['seconds']:>9.0f}")
        grid = [r for r in cells if not r["auto"]]
        wanted = rules.get((name, method))
        rule = next((r for r in sorted(cells, key=lambda r: not r["auto"])
                     if cell_values(r) == wanted), None)
        if grid and rule:
            best = max(grid, key=lambda r: r["score"])
            summary.append((name, method, best, rule, len(grid)))
        elif grid and wanted:
            print(f"{name:<9}{method:<7}the rule picks {wanted[0]:g} ep x {wanted[1]:g}, {wanted[2]} examples a step "
                  "today: not measured")
    print(f"\n{'dataset':<9}{'method':<7}{'cells':>6}  {'best cell':<18}{'best':>7}  {'rule picks':<26}{'rule':>7}"
          f"{'gap':>8}  within target")
    for name, method, best, rule, n in summary:
        gap = rule["score"] - best["score"]
        ok = gap >= -0.02 or rule["score"] >= 0.95 * best["score"] or rule["score"] >= best["score"]
        print(f"{name:<9}{method:<7}{n:>6}  {label(best):<18}{best['score']:>7.3f}  {label(rule):<26}"
              f"{rule['score']:>7.3f}{gap:>+8.3f}  {'yes' if ok else 'no'}")


def label(r: dict) -> str:
    text = f"{r['epochs']:g} ep x {r['learning_rate']:g} /{cell_values(r)[2]}"
    return f"auto ({text})" if r["auto"] else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--epochs", nargs="+", type=float, help="override the grid's epochs")
    parser.add_argument("--rates", nargs="+", type=float, help="override the grid's learning rates")
    parser.add_argument("--no-auto", action="store_true", help="skip the rule's own cell")
    parser.add_argument("--no-grid", action="store_true", help="only the rule's own cell")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON lines of measured cells")
    parser.add_argument("--table-only", action="store_true", help="print the table of --results and stop")
    args = parser.parse_args()
    tokenizer = load_tokenizer(MODEL)
    measured = read_results(args.results)
    rules = {(name, method): rule_values(DATASETS[name], method, tokenizer)
             for name, method in {(r["dataset"], r["method"]) for r in measured}
             | ({(name, method) for name in args.datasets for method in args.methods} if not args.table_only else set())}
    if not args.table_only:
        # An auto cell counts as done only at the values the rule resolves today.
        done = {(r["dataset"], r["method"], r["requested"]) for r in measured
                if not r["auto"] or cell_values(r) == rules[(r["dataset"], r["method"])]}
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.datasets:
                ds = DATASETS[name]
                for method in args.methods:
                    grid = GRID[method]
                    cells = [] if args.no_grid else [
                        (e, r) for e in (args.epochs or grid["epochs"]) for r in (args.rates or grid["rates"])]
                    for epochs, rate in cells + ([] if args.no_auto else [("auto", "auto")]):
                        requested = f"{epochs}x{rate}"
                        if (name, method, requested) in done:
                            continue
                        out = Path(tmp) / f"{name}-{method}-{epochs}-{rate}"
                        score, summary, train = cell(ds, method, epochs, rate, out, args.threads)
                        row = {"dataset": name, "method": method, "requested": requested, "auto": epochs == "auto",
                               "epochs": train.epochs, "learning_rate": train.learning_rate,
                               "examples_per_step": train.examples_per_step, "metric": ds.metric,
                               "score": round(score, 4), "steps": summary["steps"],
                               "result_step": summary["result_step"], "seconds": summary["wall_seconds"],
                               "threads": args.threads}
                        args.results.parent.mkdir(parents=True, exist_ok=True)
                        with args.results.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{name} {method} {label(row)}: {ds.metric} {score:.3f} ({summary['steps']} steps, "
                              f"{summary['wall_seconds']:.0f} s)", flush=True)
    print_table(read_results(args.results), rules)


if __name__ == "__main__":
    main()
