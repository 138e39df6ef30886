"""Experiment tracking: the run's events reported to TensorBoard, MLflow and/or Weights & Biases.

    train:
      report_to: [tensorboard, mlflow, wandb]      # default: none
      tracking: {project: lumo, name: lora-r16, tags: [support], tracking_uri: http://mlflow:5000}

Each backend is its library, installed as an extra (`pip install -e ".[tracking]"`), and reads the
same events as metrics.jsonl (slmtune/training/events.py): step losses, learning rate, tokens/s and
the objective's metrics per step; validation loss and metrics per evaluation. At the start the
resolved recipe goes in as flat parameters; at the end the summary's numbers as final metrics and
recipe.yaml, summary.json and the trained adapter/model folder as artifacts.

    tensorboard  event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)
    mlflow       tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite in RUN_DIR/mlflow.db (artifacts
                 in RUN_DIR/mlartifacts; `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`);
                 experiment = tracking.experiment, else tracking.project, else "slmtune", run name = tracking.name
    wandb        project/entity/name/tags from tracking; files in RUN_DIR/wandb; $WANDB_MODE=offline
                 (or no login) keeps the run on disk for a later `wandb sync`

A tracker that cannot start (library missing, server unreachable) fails the run before training,
with the reason, rather than training for an hour unreported. Adding a backend is one class here
and one line in TRACKERS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from slmtune.config import RecipeError, TrackingSection
from slmtune.training import events


class TrackingError(RecipeError):
    """A tracking backend is not installed or could not start; the message says which and how to fix it."""


class Tracker(Protocol):
    def log(self, event: events.Event) -> None:
        """Report one training event (steps and evaluations; others may be ignored)."""

    def finish(self, summary: dict | None, files: list[Path]) -> None:
        """Close the run: `summary` (None when training failed) and the files to keep as artifacts."""


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """The resolved recipe as flat `section.key` parameters (trackers take flat key/value pairs)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_params(value, name + ".")
        else:
            out[name] = str(value)
    return out


def step_metrics(event: events.Event) -> tuple[int, dict[str, float]] | None:
    """(step, {name: value}) for the events trackers plot."""
    if isinstance(event, events.Step):
        values = {"train/loss": event.loss, "train/learning_rate": event.lr, "train/tokens_per_second":
                  event.tokens_per_second, "train/epoch": event.epoch}
        if event.grad_norm is not None:
            values["train/grad_norm"] = event.grad_norm
        values |= {f"train/{k}": v for k, v in event.metrics.items()}
        return event.step, values
    if isinstance(event, events.Eval):
        values = {f"eval/{k}": v for k, v in event.metrics.items()}
        if event.eval_loss is not None:
            values["eval/loss"] = event.eval_loss
        return event.step, values
    return None


def final_numbers(summary: dict) -> dict[str, float]:
    return {f"final/{k}": float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, params: dict[str, str], tracking: TrackingSection):
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional extra: tensorboard
        except ImportError as err:
            raise TrackingError('report_to tensorboard needs the tensorboard package: pip install -e ".[tracking]"') from err
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()), 0)

    def log(self, event: events.Event) -> None:
        found = step_metrics(event)
        if found:
            step, values = found
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def finish(self, summary: dict | None, files: list[Path]) -> None:
        if summary is not None:
            step = int(summary.get("steps") or 0)
            for name, value in final_numbers(summary).items():
                self.writer.add_scalar(name, value, step)
        self.writer.close()


class MlflowTracker:
    def __init__(self, run_dir: Path, params: dict[str, str], tracking: TrackingSection):
        try:
            import mlflow  # optional extra: mlflow-skinny
        except ImportError as err:
            raise TrackingError('report_to mlflow needs mlflow: pip install -e ".[tracking]"') from err
        self.mlflow = mlflow
        # MLflow 3 keeps its plain-file store in maintenance mode; the local default is SQLite in the run.
        uri = (tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        try:
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            name = tracking.experiment or tracking.project or "slmtune"
            experiment = self.client.get_experiment_by_name(name)
            # Artifacts of a local store stay beside it (MLflow's default would be ./mlartifacts in the cwd).
            location = (run_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            experiment_id = (experiment.experiment_id if experiment
                             else self.client.create_experiment(name, artifact_location=location))
            tags = {f"tag.{t}": "true" for t in tracking.tags}
            self.run_id = self.client.create_run(experiment_id, run_name=tracking.name or run_dir.name,
                                                 tags=tags).info.run_id
            # MLflow caps a parameter value's length; a recipe value beyond it is cut, not an error.
            for key, value in params.items():
                self.client.log_param(self.run_id, key, value[:6000])
        except Exception as err:  # noqa: BLE001 - any backend failure is a clear tracking error
            raise TrackingError(f"report_to mlflow: could not start a run at {uri}: {err}") from err
        self.uri = uri

    def log(self, event: events.Event) -> None:
        found = step_metrics(event)
        if found:
            step, values = found
            for name, value in values.items():
                self.client.log_metric(self.run_id, name.replace("/", "."), value, step=step)

    def finish(self, summary: dict | None, files: list[Path]) -> None:
        if summary is not None:
            for name, value in final_numbers(summary).items():
                self.client.log_metric(self.run_id, name.replace("/", "."), value)
            for path in files:
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
                elif path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "FAILED")


class WandbTracker:
    def __init__(self, run_dir: Path, params: dict[str, str], tracking: TrackingSection):
        try:
            import wandb  # optional extra: wandb
        except ImportError as err:
            raise TrackingError('report_to wandb needs wandb: pip install -e ".[tracking]"') from err
        self.wandb = wandb
        try:
            self.run = wandb.init(project=tracking.project or "slmtune", entity=tracking.entity,
                                  name=tracking.name or run_dir.name, tags=list(tracking.tags) or None,
                                  config=params, dir=str(run_dir), reinit="create_new")
        except Exception as err:  # noqa: BLE001 - e.g. online mode without a login
            raise TrackingError(f"report_to wandb: could not start a run ({err}); set WANDB_MODE=offline to keep "
                                "it on disk, or `wandb login`") from err

    def log(self, event: events.Event) -> None:
        found = step_metrics(event)
        if found:
            step, values = found
            self.run.log(values, step=step)

    def finish(self, summary: dict | None, files: list[Path]) -> None:
        if summary is not None:
            self.run.summary.update(final_numbers(summary))
            artifact = self.wandb.Artifact(f"{self.run.name or 'run'}-result".replace("/", "-"), type="model")
            for path in files:
                if path.is_dir():
                    artifact.add_dir(str(path), name=path.name)
                elif path.is_file():
                    artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if summary is not None else 1)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Trackers:
    """The recipe's trackers as one: log() to each, finish() each (a failing backend at the end is
    reported, not allowed to lose the trained result)."""

    def __init__(self, names: list[str], run_dir: Path, recipe_tree: dict, tracking: TrackingSection):
        self.trackers: list[Tracker] = []
        params = flat_params(recipe_tree)
        try:
            for name in names:
                self.trackers.append(TRACKERS[name](run_dir, params, tracking))
        except Exception:
            self.finish(None, [])
            raise

    def log(self, event: events.Event) -> None:
        for tracker in self.trackers:
            tracker.log(event)

    def finish(self, summary: dict | None, files: list[Path]) -> list[str]:
        problems = []
        for tracker in self.trackers:
            try:
                tracker.finish(summary, files)
            except Exception as err:  # noqa: BLE001 - see the class docstring
                problems.append(f"{type(tracker).__name__}: {err}")
        self.trackers = []
        return problems
