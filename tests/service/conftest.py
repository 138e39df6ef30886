"""A real fine-tuning service for the tests: uvicorn in a background thread on a free port, with the
tiny Llama from tests/conftest.py as the one base model ("tiny"), workers as real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import chat_example, write_jsonl
from tests.serve.conftest import ServerThread

PG_URL = os.environ.get("SLMTUNE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BASE = "tiny"


def training_rows(n: int = 12) -> list[dict]:
    return [chat_example(f"What is fact number {i}?", f"Fact {i}: the lamp lasts {i} hours.") for i in range(n)]


@dataclass
class Service:
    url: str
    settings: object
    server: ServerThread
    app: object
    keys: dict[str, str] = field(default_factory=dict)
    workers: list[subprocess.Popen] = field(default_factory=list)

    def client(self, tenant: str = "acme"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.key(tenant), max_retries=0, timeout=60)

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            from slmtune.service.auth import create_key

            self.keys[tenant] = create_key(self.app.state.service.store, tenant)
        return self.keys[tenant]

    def start_worker(self) -> subprocess.Popen:
        env = os.environ | worker_env(self.settings)
        proc = subprocess.Popen([sys.executable, "-m", "slmtune.cli", "worker", "--db", self.settings.db_url],
                                env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.terminate()
        for p in self.workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.server.stop()


def worker_env(settings) -> dict:
    import json

    out = {}
    for key, value in settings.model_dump(mode="json").items():
        if value is not None:
            out[f"SLMTUNE_{key.upper()}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    out["SLMTUNE_DB"] = settings.db_url
    return out


def start_service(home: Path, base_dir: Path, *, db: str | None = None, workers: int = 1, base: str = BASE,
                  train_threads: int = 1, **extra) -> Service:
    from slmtune.service.app import create_service_app
    from slmtune.service.settings import Settings

    settings = Settings(home=home, db=db, workers=workers, models={base: str(base_dir)}, heartbeat_interval=0.5,
                        heartbeat_timeout=4.0, poll_interval=0.2, train_threads=train_threads, **extra)
    app = create_service_app(settings)
    server = ServerThread(app).start()
    return Service(server.url, settings, server, app)


def wait_for(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")
        time.sleep(0.3)


SMOLLM2 = "smollm2-135m-instruct"


@contextmanager
def smollm2_job(home: Path, monkeypatch, tenant: str, train_file: Path, *, timeout: float,
                settings: dict | None = None, seed: int = 42, **create):
    """For the acceptance tests: a fresh service (`settings`: Settings fields beyond the defaults) on
    the real SmolLM2-135M-Instruct, one job on `train_file` (`create`: jobs.create's other
    arguments) run to its end; yields (client, job)."""
    from slmtune import models
    from tests.test_models import real_home

    monkeypatch.setenv("SLMTUNE_HOME", str(real_home()))
    service = start_service(home, models.pull(SMOLLM2), base=SMOLLM2, train_threads=2, **(settings or {}))
    try:
        client = service.client(tenant).with_options(timeout=600)
        with open(train_file, "rb") as f:
            training = client.files.create(file=(train_file.name, f), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=SMOLLM2, training_file=training.id, seed=seed, **create)
        yield client, wait_for(client, job.id, timeout=timeout)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def sqlite_service(tmp_path_factory, tiny_llama_dir):
    service = start_service(tmp_path_factory.mktemp("svc-home"), tiny_llama_dir, workers=1, max_upload_bytes=20000)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def pg_url():
    """A fresh schema on the test PostgreSQL server, dropped afterwards."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    schema = f"slmtest_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except Exception as err:  # noqa: BLE001
        admin.dispose()
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable: {type(err).__name__}: {str(err).splitlines()[0]}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture
def upload(tmp_path):
    def _upload(client, rows, name="train.jsonl"):
        path = write_jsonl(tmp_path / name, rows)
        with open(path, "rb") as f:
            return client.files.create(file=(name, f), purpose="fine-tune")
    return _upload
