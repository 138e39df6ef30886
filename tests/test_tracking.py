"""train.report_to (and `slmtune plot`): each tracker's own files, read back with that backend's own reader, hold the run's
metrics (the same as metrics.jsonl), the recipe as parameters and the result as artifacts."""

from __future__ import annotations

import json
import struct

import pytest

from slmtune.config import RecipeError, recipe_from_dict
from slmtune.training.run import run
from slmtune.training.tracking import TRACKERS, TrackingError, flat_params
from tests.conftest import chat_example, write_jsonl


def recipe(tmp_path, tiny_llama_dir, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", [chat_example(f"What is fact number {i}?", f"Fact {i} is {i}.")
                                                  for i in range(12)])
    return recipe_from_dict({
        "model": {"name": str(tiny_llama_dir)},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(data), "max_length": 64, "validation_split": 0.25},
        "train": {"micro_batch_size": 2, "learning_rate": 1e-3, "seed": 1, "precision": "fp32", "max_steps": 3,
                  "eval_every": 2} | train,
        "output": {"dir": str(tmp_path / "run")},
    })


def logged(run_dir) -> tuple[dict[int, float], dict[int, float]]:
    """{step: loss}, {step: eval_loss} from metrics.jsonl: what every tracker must also hold."""
    steps, evals = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "step":
            steps[event["step"]] = event["loss"]
        elif event["event"] == "eval":
            evals[event["step"]] = event["eval_loss"]
    return steps, evals


def test_tensorboard_event_files_hold_the_runs_losses(tmp_path, tiny_llama_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(recipe(tmp_path, tiny_llama_dir, report_to="tensorboard"), progress=False)
    steps, evals = logged(result.run_dir)
    reader = EventAccumulator(str(result.run_dir / "tensorboard"))
    reader.Reload()
    got = {e.step: e.value for e in reader.Scalars("train/loss")}
    assert got.keys() == steps.keys() and all(got[s] == pytest.approx(steps[s], rel=1e-6) for s in steps)
    assert {e.step: e.value for e in reader.Scalars("eval/loss")} == pytest.approx(evals, rel=1e-6)
    assert reader.Scalars("final/steps")[0].value == 3


def test_mlflow_store_run_has_params_metrics_and_artifacts(tmp_path, tiny_llama_dir):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    result = run(recipe(tmp_path, tiny_llama_dir, report_to=["mlflow"],
                        tracking={"project": "lumo", "name": "r4", "tags": ["support"], "tracking_uri": uri}),
                 progress=False)
    steps, evals = logged(result.run_dir)
    client = mlflow.MlflowClient(tracking_uri=uri)
    [found] = client.search_runs([client.get_experiment_by_name("lumo").experiment_id])
    assert found.info.run_name == "r4" and found.info.status == "FINISHED"
    assert found.data.params["method.lora_r"] == "4" and found.data.params["train.max_steps"] == "3"
    assert found.data.tags["tag.support"] == "true"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train.loss")}
    assert history == pytest.approx(steps, rel=1e-6)
    assert {m.step: m.value for m in client.get_metric_history(found.info.run_id, "eval.loss")} == \
        pytest.approx(evals, rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"recipe.yaml", "summary.json", "adapter"} <= artifacts


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: LevelDB's log format (32 KiB blocks of
    7-byte-headed chunks) after W&B's 7-byte file header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == 4 else chunk)
            pending = b""
            yield record
        elif kind in (2, 3):
            pending += chunk


def test_wandb_offline_run_holds_history_config_and_artifact(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run(recipe(tmp_path, tiny_llama_dir, report_to="wandb", tracking={"project": "lumo"}), progress=False)
    [path] = list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    history: dict[int, dict[str, float]] = {}
    config, artifacts, summary = {}, [], {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind in ("config", "run"):  # the run record carries the config given to wandb.init
            update = record.config.update if kind == "config" else record.run.config.update
            config |= {item.key: json.loads(item.value_json) for item in update}
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.summary.update}
        elif kind == "artifact":
            artifacts.append((record.artifact.type, {e.path for e in record.artifact.manifest.contents}))
    steps, evals = logged(result.run_dir)
    assert {s: history[s]["train/loss"] for s in steps} == pytest.approx(steps, rel=1e-5)
    assert {s: history[s]["eval/loss"] for s in evals} == pytest.approx(evals, rel=1e-5)
    assert config["method.lora_r"] == "4" and config["train.max_steps"] == "3"
    assert summary["final/steps"] == 3
    [(kind, files)] = artifacts
    assert kind == "model" and {"recipe.yaml", "summary.json", "adapter/adapter_config.json"} <= files


def test_an_unknown_backend_is_a_recipe_error(tmp_path, tiny_llama_dir):
    with pytest.raises(RecipeError, match="report_to"):
        recipe(tmp_path, tiny_llama_dir, report_to=["comet"])


def test_a_tracker_that_cannot_start_fails_before_training(tmp_path, tiny_llama_dir, monkeypatch):
    """An unreachable MLflow server: the run stops with the reason before any step is trained."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default backoff takes minutes
    bad = recipe(tmp_path, tiny_llama_dir, report_to="mlflow", tracking={"tracking_uri": "http://127.0.0.1:9/"})
    with pytest.raises(TrackingError, match="could not start a run at http://127.0.0.1:9/"):
        run(bad, progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()
    assert logged(tmp_path / "run") == ({}, {})


def test_recipes_flatten_to_section_keys():
    assert flat_params({"train": {"lr": 1, "objective": {"name": "dpo"}}, "seed": None}) == {
        "train.lr": "1", "train.objective.name": "dpo", "seed": "None"}
    assert set(TRACKERS) == {"tensorboard", "mlflow", "wandb"}


def test_plot_draws_one_png_for_several_runs_with_dpo_margins(tmp_path, tiny_llama_dir, capsys):
    """Two runs in one figure; a preference run adds the reward-margin panel (taller image)."""
    from PIL import Image

    from slmtune.cli import main
    from slmtune.plot import curves

    sft = run(recipe(tmp_path / "sft", tiny_llama_dir), progress=False).run_dir
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."} for i in range(8)])
    dpo = run(recipe_from_dict({
        "model": {"name": str(tiny_llama_dir)}, "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(pairs), "max_length": 64, "validation_split": 0},
        "train": {"objective": "dpo", "micro_batch_size": 2, "max_steps": 2, "precision": "fp32", "seed": 1},
        "output": {"dir": str(tmp_path / "dpo")}}), progress=False).run_dir
    assert [step for step, _ in curves(dpo)["margin"]] == [1, 2]
    steps, evals = logged(sft)
    assert dict(curves(sft)["train"]) == steps and dict(curves(sft)["eval"]) == evals

    assert main(["plot", str(sft)]) == 0
    single = Image.open(capsys.readouterr().out.strip())
    assert main(["plot", str(sft), str(dpo), "--output", str(tmp_path / "both.png")]) == 0
    both = Image.open(tmp_path / "both.png")
    assert both.format == "PNG" and both.size[1] > single.size[1]
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
