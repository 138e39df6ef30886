"""The published fine-tuning results: base model vs fine-tuned, per task and method.

    python benchmarks/results.py                                  # every task, LoRA, + methods on two tasks
    python benchmarks/results.py --tasks ner        # rerun one task; the other rows of docs/results/results.json stay
    python benchmarks/results.py --tasks classification --methods-on     # only its LoRA row; its other methods' rows stay
    python benchmarks/results.py --tasks classification --methods qlora dora full   # those rows only; LoRA's stays
    python benchmarks/results.py --tasks classification --max-examples 16 --test-limit 4 --runs runs/smoke --out /tmp/r.md

A finished (task, method) pair is reused when its run directory and eval.json already exist, so an
interrupted matrix continues where it stopped (`--fresh` to redo everything).

For each task: score SmolLM2-135M-Instruct on the task's test split (validation for domain, which
has no test split), fine-tune it with recipes/<task>/lora.yaml, score the run the same way. On the
`--methods-on` tasks also QLoRA, DoRA and full fine-tuning with the same data and schedule.
Training and scoring each run in their own process (`slmtune train`, `slmtune eval`), so peak RSS
is per run. Writes docs/results.md (table + the command), docs/results/*.png (loss curves; base vs
fine-tuned bars) and docs/results/results.json. Every number in the table comes from this run.

Run it with the machine otherwise idle; the table records the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from slmtune.tasks import TASKS as TASKS_BY_NAME

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
TASKS = ["classification", "ner", "translation", "qa", "creative", "domain", "chat"]
# The metric the table leads with (the task's METRIC), and whether higher is better.
HEADLINE = {task: (TASKS_BY_NAME[task].METRIC, task != "domain") for task in TASKS}
# Test rows scored per task: long generations (poems, chat replies) cost ~10x a label, so those
# tasks are scored on fewer rows to keep the matrix inside ~2 hours on 2 cores.
TEST_LIMIT = {"classification": 300, "ner": 150, "translation": 100, "qa": 200, "creative": 50,
              "domain": 179, "chat": 50}
NOTES_MARKER = "<!-- notes: written by hand, kept when the table is regenerated -->"
METHOD_SECTIONS = {
    "qlora": ({"name": "qlora", "lora_r": 16, "lora_alpha": 32}, None),
    "dora": ({"name": "dora", "lora_r": 16, "lora_alpha": 32}, None),
    "full": ({"name": "full"}, 5e-5),
}


def slmtune(*args: str) -> None:
    cmd = [sys.executable, "-m", "slmtune.cli", *args]
    print("$ slmtune " + " ".join(args), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")


def test_file(task: str) -> Path:
    return DATA / task / ("validation.jsonl" if task == "domain" else "test.jsonl")


def evaluate(target: str, task: str, out: Path, limit: int, reuse: bool) -> dict:
    if reuse and out.exists():
        return json.loads(out.read_text())["metrics"]
    slmtune("eval", target, "--data", str(test_file(task)), "--task", task, "--limit", str(limit),
            "--output", str(out), "--no-progress")
    return json.loads(out.read_text())["metrics"]


def train(task: str, method: str, out_dir: Path, max_examples: int | None, reuse: bool) -> Path:
    if reuse and (out_dir / "summary.json").exists():
        return out_dir
    recipe = yaml.safe_load((REPO / "recipes" / task / "lora.yaml").read_text())
    if max_examples:
        recipe["data"]["max_examples"] = max_examples
    if method != "lora":
        section, lr = METHOD_SECTIONS[method]
        recipe["method"] = dict(section)
        if lr:
            recipe["train"]["learning_rate"] = lr
    recipe["output"] = {"dir": str(out_dir), "overwrite": True}
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    slmtune("train", str(path), "--no-progress")
    return out_dir


def loss_curve(run_dir: Path) -> list[list[float]]:
    """[[step, train loss], ...] from the run's metrics.jsonl."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [[m["step"], m["loss"]] for m in metrics if m["event"] == "step"]


def eval_seconds(scores: Path) -> float | None:
    return json.loads(scores.read_text()).get("seconds") if scores.exists() else None


def plots(rows: list[dict], figures: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    names = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in rows:
        if not row.get("loss_curve"):  # rows recorded before the curves were kept in results.json
            continue
        steps, losses = zip(*row["loss_curve"])
        ax.plot(steps, losses, label=f"{row['task']} {row['method']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (assistant tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(figures / "loss_curves.png", dpi=120)
    names.append("loss_curves.png")
    lora = [r for r in rows if r["method"] == "lora"]
    # One panel per task: the metrics have different scales (F1 in 0-1, chrF and perplexity in tens).
    fig, axes = plt.subplots(1, len(lora), figsize=(2 * len(lora), 3.2), squeeze=False)
    for ax, r in zip(axes[0], lora):
        ax.bar(["base", "LoRA"], [r["base"], r["tuned"]], color=["tab:blue", "tab:orange"])
        lower = "" if HEADLINE[r["task"]][1] else " (lower is better)"
        ax.set_title(f"{r['task']}\n{r['metric']}{lower}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(figures / "base_vs_finetuned.png", dpi=120)
    names.append("base_vs_finetuned.png")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=TASKS, choices=TASKS)
    parser.add_argument("--methods-on", nargs="*", default=["classification", "qa"], choices=TASKS)
    parser.add_argument("--methods", nargs="*", default=["lora", *METHOD_SECTIONS], choices=["lora", *METHOD_SECTIONS],
                        help="methods to run (LoRA on every task, the others on the --methods-on tasks); "
                             "the published rows of the others stay")
    parser.add_argument("--test-limit", type=int, help="test rows per task (default: TEST_LIMIT)")
    parser.add_argument("--max-examples", type=int, help="override every recipe's data.max_examples (smoke runs)")
    parser.add_argument("--fresh", action="store_true", help="retrain and rescore finished pairs")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the table and plots from the published results.json, without training or scoring")
    parser.add_argument("--runs", default="runs/bench")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args()

    runs = REPO / args.runs
    runs.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/results.py " + " ".join(sys.argv[1:])).strip()
    figures = REPO / Path(args.out).parent / "results"
    published = figures / "results.json"
    rows = json.loads(published.read_text()) if args.table_only else []
    for task in [] if args.table_only else args.tasks:
        metric, higher = HEADLINE[task]
        limit = args.test_limit or TEST_LIMIT[task]
        reuse = not args.fresh
        base = evaluate("smollm2-135m-instruct", task, runs / f"{task}-base.json", limit, reuse)
        methods = ["lora"] + (list(METHOD_SECTIONS) if task in args.methods_on else [])
        for method in [m for m in methods if m in args.methods]:
            run_dir = train(task, method, runs / f"{task}-{method}", args.max_examples, reuse)
            scores = runs / f"{task}-{method}-eval.json"
            # A retrained run makes its old scores stale.
            fresh_scores = scores.exists() and scores.stat().st_mtime > (run_dir / "summary.json").stat().st_mtime
            tuned = evaluate(str(run_dir), task, scores, limit, reuse and fresh_scores)
            summary = json.loads((run_dir / "summary.json").read_text())
            better = tuned[metric] > base[metric] if higher else tuned[metric] < base[metric]
            rows.append({"task": task, "method": method, "metric": metric, "base": base[metric],
                         "tuned": tuned[metric], "better": better, "test_rows": limit,
                         "others": {k: (base[k], tuned[k]) for k in tuned if k not in (metric, "n")
                                    and isinstance(tuned[k], (int, float)) and isinstance(base.get(k), (int, float))}, "run_dir": str(run_dir),
                         "train_examples": summary["train_examples"], "trainable_params": summary["trainable_params"],
                         "peak_rss_mb": summary["peak_rss_mb"], "train_seconds": summary["train_seconds"],
                         "tokens_per_second": summary["tokens_per_second"], "threads": summary["threads"],
                         # Kept in the row so the table and plots can be rebuilt without the run directory.
                         "loss_curve": loss_curve(run_dir), "command": command, "date": time.strftime("%Y-%m-%d"),
                         "base_eval_seconds": eval_seconds(runs / f"{task}-base.json"),
                         "eval_seconds": eval_seconds(scores)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            (runs / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    figures.mkdir(parents=True, exist_ok=True)
    partial = set(args.tasks) != set(TASKS) or set(args.methods) != {"lora", *METHOD_SECTIONS}
    if not args.table_only and partial and published.exists():
        # A run of some tasks or methods (e.g. `--tasks ner` after changing its recipe) replaces only the rows it made.
        made = {(r["task"], r["method"]) for r in rows}
        kept = [r for r in json.loads(published.read_text()) if (r["task"], r["method"]) not in made]
        methods = ["lora", *METHOD_SECTIONS]
        rows = sorted(kept + rows, key=lambda r: (TASKS.index(r["task"]), methods.index(r["method"])))
    (figures / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    images = plots(rows, figures)
    # Reused rows were trained and scored by earlier invocations: add up what each actually took.
    train_minutes = sum(r["train_seconds"] for r in rows) / 60
    timed = [r for r in rows if r.get("eval_seconds") is not None]
    base_seconds = {r["task"]: r["base_eval_seconds"] or 0 for r in timed}
    eval_minutes = (sum(r["eval_seconds"] for r in timed) + sum(base_seconds.values())) / 60
    commands: dict[str, list[str]] = {}
    for r in rows:
        key = f"`{r.get('command', 'python benchmarks/results.py')}` ({r.get('date', 'date not recorded')})"
        commands.setdefault(key, []).append(f"{r['task']} {r['method']}")
    # The invocation behind most rows is named last, for "the other rows".
    ordered = sorted(commands.items(), key=lambda item: len(item[1]))
    produced = "; ".join(f"{key} for {', '.join(names)}" for key, names in ordered[:-1])
    produced += ("; " if produced else "") + f"{ordered[-1][0]} for {'the other' if produced else 'all'} rows"
    lines = [
        "# Fine-tuning results: SmolLM2-135M-Instruct, base vs fine-tuned",
        "",
        (f"Rewritten by `{command}` from docs/results/results.json; " if args.table_only else "") +
        f"produced by {produced}, on {os.cpu_count()} CPU cores "
        f"({'/'.join(sorted({str(r['threads']) for r in rows}))} torch threads per training run), scored on the "
        "first `test rows` rows of each task's test split (domain: validation split). Training sets are the seeded "
        "samples given by each recipe's `data.max_examples` (recipes/<task>/lora.yaml). Training took "
        f"{train_minutes:.0f} minutes in all (the runs' train times); scoring took {eval_minutes:.0f} minutes for "
        f"the {len(timed)} of {len(rows)} rows that recorded it (model loading excluded).",
        "",
        "| task | method | metric | base | fine-tuned | better | test rows | train examples | "
        "trainable params | peak RSS MB | train s | tokens/s | other metrics (base → fine-tuned) |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['metric']} | {r['base']:.4g} | {r['tuned']:.4g} | "
                     f"{'yes' if r['better'] else '**no**'} | {r['test_rows']} | {r['train_examples']} | {r['trainable_params']:,} | "
                     f"{r['peak_rss_mb']:.0f} | {r['train_seconds']:.0f} | {r['tokens_per_second']:.0f} | "
                     + ", ".join(f"{k} {a:.3g} → {b:.3g}" for k, (a, b) in r["others"].items()) + " |")
    lines += [""] + [f"![{name}](results/{name})" for name in images] + [""]
    out = REPO / args.out
    # What people wrote about the numbers (below the marker) survives a rerun of the table.
    notes = out.read_text().partition(NOTES_MARKER)[2] if out.exists() else ""
    lines += [NOTES_MARKER + (notes or "\n")]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
