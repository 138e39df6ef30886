"""`slmtune plot RUN [RUN ...]`: one PNG of the runs' curves, to compare runs without a tracking server.

    slmtune plot runs/quickstart                         # -> runs/quickstart/curves.png
    slmtune plot runs/a runs/b --output compare.png

Panels from metrics.jsonl: training loss per step (solid) and validation loss per evaluation
(dashed markers, same color per run); when a run is a preference run (DPO/ORPO), a second panel
with its reward margin per step. The best evaluation kept as the result (train.select_best) is
circled. Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import os
from pathlib import Path

from slmtune.config import RecipeError
from slmtune.training import events
from slmtune.training.rundir import RunDir

PLOT_FILE = "curves.png"
MARGIN = "rewards/margin"


def curves(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "eval": [...], "margin": [...], "best": [(step, eval_loss)]} of a run."""
    run = RunDir(run_dir)
    if not run.metrics_file.is_file():
        raise RecipeError(f"{run_dir}: no metrics.jsonl (not a run directory, or it has not started)")
    out: dict[str, list[tuple[int, float]]] = {"train": [], "eval": [], "margin": [], "best": []}
    for event in run.metrics():
        if isinstance(event, events.Step):
            out["train"].append((event.step, event.loss))
            if MARGIN in event.metrics:
                out["margin"].append((event.step, event.metrics[MARGIN]))
        elif isinstance(event, events.Eval) and event.eval_loss is not None:
            out["eval"].append((event.step, event.eval_loss))
        elif isinstance(event, events.Best):
            # Marked on the eval loss curve, whatever chose it (the loss, or a task metric).
            losses = dict(out["eval"])
            out["best"] = [(event.step, losses.get(event.step, event.value))]
    return out


def plot_runs(run_dirs: list[str | os.PathLike], output: str | os.PathLike | None = None) -> Path:
    """Write the PNG (default: RUN/curves.png for one run, ./curves.png for several); returns its path."""
    try:
        import matplotlib  # optional extra: plot

        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RecipeError('slmtune plot needs matplotlib: pip install -e ".[plot]"') from err
    if not run_dirs:
        raise RecipeError("slmtune plot needs at least one run directory")
    data = {str(d): curves(d) for d in run_dirs}
    with_margin = any(c["margin"] for c in data.values())
    figure, axes = plt.subplots(2 if with_margin else 1, 1, figsize=(8, 7 if with_margin else 4.5), squeeze=False)
    loss_axis = axes[0][0]
    for index, (name, c) in enumerate(data.items()):
        color = f"C{index % 10}"
        label = Path(name).name or name
        if c["train"]:
            loss_axis.plot(*zip(*c["train"]), color=color, linewidth=1.2, label=f"{label} train")
        if c["eval"]:
            loss_axis.plot(*zip(*c["eval"]), color=color, linestyle="--", marker="o", markersize=3,
                           label=f"{label} validation")
        if c["best"]:
            loss_axis.plot(*zip(*c["best"]), color=color, marker="o", markersize=10, fillstyle="none", linestyle="")
        if with_margin and c["margin"]:
            axes[1][0].plot(*zip(*c["margin"]), color=color, linewidth=1.2, label=label)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend(fontsize=8)
    if with_margin:
        axes[1][0].set_xlabel("step")
        axes[1][0].set_ylabel("reward margin (chosen - rejected)")
        axes[1][0].grid(alpha=0.3)
        axes[1][0].legend(fontsize=8)
    figure.tight_layout()
    path = Path(output) if output else (Path(run_dirs[0]) / PLOT_FILE if len(run_dirs) == 1 else Path(PLOT_FILE))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
