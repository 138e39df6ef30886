"""Jobs' `integrations` (OpenAI's wandb type, slmtune's mlflow type): validated, echoed on the job,
and the run reports there (W&B offline into the job's run folder, MLflow to the server's store)."""

from __future__ import annotations

import json
import os
import sqlite3

import httpx2 as httpx
import openai
import pytest

from tests.service.conftest import BASE, start_service, training_rows, wait_for

HP = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10}


@pytest.fixture(scope="module")
def tracked_service(tmp_path_factory, tiny_llama_dir):
    """A service whose workers report W&B runs offline and MLflow runs to the operator's SQLite store."""
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # workers inherit it when spawned
    home = tmp_path_factory.mktemp("svc-tracked")
    store = f"sqlite:///{home / 'mlflow.db'}"
    service = start_service(home, tiny_llama_dir, workers=1, mlflow_tracking_uri=store)
    yield service
    service.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_a_job_reports_to_wandb_and_mlflow_and_echoes_its_integrations(tracked_service, upload):
    client = tracked_service.client()
    f = upload(client, training_rows(12))
    integrations = [{"type": "wandb", "wandb": {"project": "lamps", "name": "first", "tags": ["support"]}},
                    {"type": "mlflow", "mlflow": {"experiment": "lamps-exp"}}]
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, seed=3, integrations=integrations,
                                         method={"type": "supervised", "supervised": {"hyperparameters": HP}})
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    raw = httpx.get(f"{tracked_service.url}/v1/fine_tuning/jobs/{job.id}",
                    headers={"Authorization": f"Bearer {tracked_service.key('acme')}"}).json()
    assert raw["integrations"] == [
        {"type": "wandb", "wandb": {"project": "lamps", "name": "first", "tags": ["support"]}},
        {"type": "mlflow", "mlflow": {"experiment": "lamps-exp"}}]

    run_dir = tracked_service.settings.service_dir / "jobs" / job.id / "run"
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "report_to:" in recipe and "lamps-exp" in recipe
    [offline] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"train/loss" in offline.read_bytes()

    import mlflow

    tracking = mlflow.MlflowClient(tracking_uri=tracked_service.settings.mlflow_tracking_uri)
    [found] = tracking.search_runs([tracking.get_experiment_by_name("lamps-exp").experiment_id])
    assert found.info.run_name == "first" and found.info.status == "FINISHED"
    history = tracking.get_metric_history(found.info.run_id, "train.loss")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.step for m in history] == [e["step"] for e in steps if e["event"] == "step"]
    with sqlite3.connect(tracked_service.settings.mlflow_tracking_uri.removeprefix("sqlite:///")) as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 1


@pytest.mark.parametrize("integrations,message", [
    ([{"type": "comet", "comet": {}}], "type"),
    ([{"type": "wandb"}], "needs its `wandb` object"),
    ([{"type": "wandb", "wandb": {"project": "a"}}, {"type": "wandb", "wandb": {"project": "b"}}],
     "at most one of each type"),
    ([{"type": "mlflow", "mlflow": {"tracking_uri": "http://169.254.169.254/"}}], "tracking_uri"),
])
def test_bad_integrations_are_400s(tracked_service, upload, integrations, message):
    client = tracked_service.client("checker")
    f = upload(client, training_rows(12))
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model=BASE, training_file=f.id, integrations=integrations)
    assert message in str(caught.value)
    assert client.fine_tuning.jobs.list().data == []
