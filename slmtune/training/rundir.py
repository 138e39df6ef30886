"""A run directory: the one module that knows its layout. Everything else asks a `RunDir`.

    runs/mine/
      recipe.yaml       the resolved recipe, written first (so a crashed run can be resumed)
      metrics.jsonl     one step / eval event per line (slmtune/training/events.py)
      checkpoints/      step-000012/ ...: the trained weights, optimizer.pt, scheduler.pt, rng.pt,
                        state.json; kept newest first (train.keep_checkpoints), plus the best one
      adapter/          the result of an adapter method (PEFT format), or
      model/            the result of full fine-tuning (a complete Hugging Face model)
      summary.json      written last: the run finished
      eval.json         `slmtune eval RUN_DIR` (optional)

    run_dir = RunDir("runs/mine")
    run_dir.is_finished(), run_dir.recipe(), run_dir.artifact(), run_dir.latest_checkpoint()
    model, tokenizer = load_for_inference("runs/mine")      # or any model name `models.resolve` takes

Every file and folder is written atomically (slmtune/atomic.py): a reader sees the old version or
the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from slmtune import atomic
from slmtune.config import Recipe, RecipeError, load_recipe
from slmtune.methods import METHODS
from slmtune.models import load_model, load_tokenizer
from slmtune.training import events

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
ARTIFACTS = ("adapter", "model")
CHECKPOINT_STATE = "state.json"


class RunDirError(RecipeError):
    """A folder that is not (or not yet) what the caller needs; the message says what is missing."""


def checkpoint_step(path: Path) -> int:
    """The optimizer step of a checkpoints/step-N folder."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    # --- reading --------------------------------------------------------------------------------
    @staticmethod
    def holds_run(path: str | os.PathLike) -> bool:
        """Whether `path` is a run directory (it has a recipe.yaml)."""
        return (Path(path) / RECIPE).is_file()

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def eval_file(self) -> Path:
        return self.path / EVAL

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def recipe(self) -> Recipe:
        if not self.holds_run(self.path):
            raise RunDirError(f"{self.path}: not a run directory (no {RECIPE})")
        return load_recipe(self.recipe_file)

    def is_finished(self) -> bool:
        return self.summary_file.is_file()

    def summary(self) -> dict:
        if not self.is_finished():
            raise RunDirError(f"{self.path}: the run has not finished (no {SUMMARY})")
        return json.loads(self.summary_file.read_text())

    def artifact_kind(self) -> str | None:
        """"adapter" or "model": the result folder that exists, or None before the run finished."""
        return next((kind for kind in ARTIFACTS if (self.path / kind).is_dir()), None)

    def artifact(self) -> Path:
        """The trained result: adapter/ or model/."""
        kind = self.artifact_kind()
        if kind is None:
            raise RunDirError(f"{self.path}: the run has not finished (neither adapter/ nor model/ exists)")
        return self.path / kind

    def artifact_path(self, kind: str) -> Path:
        return self.path / kind

    def metrics(self) -> list[events.Event]:
        """The step and eval events of metrics.jsonl, in order."""
        if not self.metrics_file.exists():
            return []
        return [events.parse(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def checkpoints(self) -> list[Path]:
        """checkpoints/step-N folders, oldest first (half-written ones are temp folders, not listed)."""
        root = self.checkpoints_dir
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir())

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:06d}"

    # --- writing (rank 0 of a run) ----------------------------------------------------------------
    def prepare(self, *, resume: bool, overwrite: bool, parallel) -> Path | None:
        """Make the folder ready for a run; returns the checkpoint to resume from (None: start fresh).
        Every rank checks; then rank 0 alone changes the folder."""
        checkpoint, wipe = None, False
        if resume:
            checkpoint = self.latest_checkpoint()
            if self.is_finished():
                raise RunDirError(f"{self.path}: this run already finished ({SUMMARY} exists); nothing to resume")
        elif self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"{self.path}: output directory exists and is not empty; resume it with "
                    f"`slmtune train --resume {self.path}`, choose another output.dir, or set output.overwrite=true"
                )
            wipe = True
        parallel.barrier()
        if parallel.is_main:
            if wipe:
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
        parallel.barrier()
        return checkpoint

    def write_recipe(self, recipe: Recipe) -> None:
        atomic.write_text(self.recipe_file, recipe.to_yaml())

    def write_summary(self, summary: dict) -> None:
        atomic.write_text(self.summary_file, json.dumps(summary, indent=2) + "\n")

    @contextmanager
    def writing_artifact(self, kind: str) -> Iterator[Path]:
        """A temp folder that becomes adapter/ or model/ (replacing an older one) when the block succeeds."""
        if kind not in ARTIFACTS:
            raise ValueError(f"artifact kind {kind!r}")
        with atomic.directory(self.path / kind, replace=True) as tmp:
            yield tmp

    @contextmanager
    def writing_checkpoint(self, step: int, keep: int, protect: int | None = None) -> Iterator[Path]:
        """A temp folder that becomes checkpoints/step-N; then all but the newest `keep` checkpoints
        (and the one of step `protect`, the best so far) are removed."""
        self.checkpoints_dir.mkdir(exist_ok=True)
        with atomic.directory(self.checkpoint(step), replace=True) as tmp:
            yield tmp
        found = self.checkpoints()
        for old in found[:-keep]:
            if protect is None or checkpoint_step(old) != protect:
                shutil.rmtree(old, ignore_errors=True)

    def open_metrics(self, resume_step: int | None) -> "MetricsLog":
        return MetricsLog(self.metrics_file, resume_step)


class MetricsLog:
    """Appends step, eval, best and warning events to metrics.jsonl; on resume, drops lines past the
    checkpoint."""

    KINDS = (events.Step, events.Eval, events.Best, events.Notice)

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and getattr(events.parse(line), "step", 0) <= resume_step]
            atomic.write_text(path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self.file = path.open("a")

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, self.KINDS):
            self.file.write(events.to_json(event) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


# --- loading a run's result -------------------------------------------------------------------------
def load_base(recipe: Recipe, **kwargs):
    """The run's base model as training loaded it (a QLoRA base quantized the same way)."""
    method = METHODS[recipe.method.name]
    return load_model(recipe.model.name, **(method.load_kwargs(recipe.method) | kwargs))


def load_for_inference(target: str | os.PathLike):
    """(model, tokenizer) in eval mode: a run directory (its base model + adapter/, or its model/)
    or anything `slmtune.models.resolve` takes."""
    if not RunDir.holds_run(target):
        model = load_model(str(target))
        model.eval()
        return model, load_tokenizer(str(target))
    run_dir = RunDir(target)
    recipe = run_dir.recipe()
    artifact = run_dir.artifact()
    if artifact.name == "model":  # full fine-tuning: a complete model
        model = load_model(str(artifact))
        model.eval()
        return model, load_tokenizer(str(artifact))
    from peft import PeftModel  # peft imports in ~8 s; plain models never need it

    model = PeftModel.from_pretrained(load_base(recipe), str(artifact))
    model.eval()
    return model, load_tokenizer(recipe.model.name)


def load_merged(target: str | os.PathLike):
    """(model, tokenizer): the run's result as one plain model, its adapter merged into the weights.

    For QLoRA the base is first dequantized, exactly as training saw it, so the merged model
    reproduces the adapter's outputs rather than those of the unquantized original. Prompt and prefix
    tuning have no weights to merge into and are refused. A plain model (anything
    `slmtune.models.resolve` takes) is returned as it is, so a base model exports like a run."""
    if not RunDir.holds_run(target):
        return load_model(str(target)), load_tokenizer(str(target))
    run_dir = RunDir(target)
    recipe = run_dir.recipe()
    artifact = run_dir.artifact()
    if artifact.name == "model":
        return load_model(str(artifact)), load_tokenizer(str(artifact))
    from peft import PeftConfig, PeftModel  # see load_for_inference

    if PeftConfig.from_pretrained(str(artifact)).is_prompt_learning:
        raise RunDirError(f"{recipe.method.name} learns virtual tokens, not weight updates: there is nothing to "
                          "merge; serve the adapter on its base model instead")
    base = load_base(recipe)
    if METHODS[recipe.method.name].quantized_base:
        base = base.dequantize().float()
    merged = PeftModel.from_pretrained(base, str(artifact)).merge_and_unload()
    return merged, load_tokenizer(recipe.model.name)
