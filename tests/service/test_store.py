"""The store without HTTP: atomic claims, heartbeats and requeueing, the "auto" rule, migrations."""

from __future__ import annotations

import threading
import time

import pytest

from slmtune.service import hyper
from slmtune.service import store as store_module
from slmtune.service.models import Job
from slmtune.service.store import Store, new_id


def make_store(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'db' / 'service.db'}")
    store.migrate()
    store.migrate()  # idempotent
    store.create_key("t", "0" * 64)
    return store


def add_job(store: Store) -> str:
    tenant = store.tenant_for_key("0" * 64)
    job = Job(id=new_id("ftjob", 8), tenant_id=tenant.id, model="m", base_path="m", training_file="file-x",
              seed=1, method="lora", hyperparameters={}, resolved={}, status="queued", result_files=[],
              run_dir="/nowhere", attempts=0, created_at=time.time())
    store.create_job(job, ["queued"])
    return job.id


def test_concurrent_claims_take_each_job_once(tmp_path):
    store = make_store(tmp_path)
    ids = {add_job(store) for _ in range(12)}
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(name):
        other = Store(store.engine.url.render_as_string(hide_password=False))  # its own connections
        while (job := other.claim(name, timeout=30)) is not None:
            with lock:
                claimed.append((name, job.id))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(j for _, j in claimed) == sorted(ids)  # every job once, none twice


def test_heartbeat_ownership_and_requeue(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    job_id = add_job(store)
    now = [time.time()]
    monkeypatch.setattr(store_module.time, "time", lambda: now[0])  # the store's clock, advanced by hand
    assert store.claim("a", timeout=30).id == job_id
    assert store.claim("b", timeout=30) is None  # running: nobody else takes it
    assert store.heartbeat(job_id, "a") == "running"
    assert store.heartbeat(job_id, "b") is None
    now[0] += 20
    assert store.requeue_stale(timeout=30) == []  # a heartbeat 20 s old is alive at a 30 s timeout
    assert store.heartbeat(job_id, "a") == "running"
    now[0] += 31
    assert store.requeue_stale(timeout=30) == [job_id]
    assert store.requeue_stale(timeout=30) == []  # once
    job = store.claim("b", timeout=30)
    assert job.id == job_id and job.attempts == 2
    assert store.heartbeat(job_id, "a") is None  # the old owner learns it lost the job
    assert not store.finish(job_id, "a", "succeeded")  # and cannot write a result
    assert store.finish(job_id, "b", "succeeded")
    assert store.get_job(job_id).status == "succeeded"


def test_paused_job_is_not_claimed_until_its_worker_lets_go(tmp_path):
    store = make_store(tmp_path)
    job_id = add_job(store)
    store.claim("a", timeout=30)
    assert store.set_status(job_id, "paused", allowed_from=("queued", "running"), message="paused")
    assert store.set_status(job_id, "queued", allowed_from=("paused",), message="resumed")
    assert store.claim("b", timeout=30) is None  # "a" is still stopping its trainer
    store.release(job_id, "a")
    assert store.claim("b", timeout=30).id == job_id


@pytest.mark.parametrize("n, expected", [(10, (10, 1)), (20, (10, 1)), (75, (7, 1)), (99, (6, 1)), (100, (5, 4)), (500, (3, 4)),
                                         (5000, (3, 8))])
def test_auto_hyperparameters(n, expected):
    values = hyper.resolve({"n_epochs": "auto"}, n)
    assert (values["n_epochs"], values["batch_size"]) == expected and values["learning_rate_multiplier"] == 1.0
    assert hyper.resolve({"n_epochs": 4, "batch_size": 2.0, "learning_rate_multiplier": 0.5}, n) == {
        "n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 0.5}


def test_job_whose_workers_keep_dying_fails(tmp_path):
    from slmtune.service.settings import Settings
    from slmtune.service.worker import Worker

    store = make_store(tmp_path)
    job_id = add_job(store)
    settings = Settings(home=tmp_path, max_attempts=2)
    for _ in range(2):  # two workers claim it and die
        store.claim("dead", timeout=30)
        store.set_status(job_id, "queued", allowed_from=("running",), message="requeued")
        store.release(job_id, "dead")
    assert Worker(settings, store, "w").run_once()
    job = store.get_job(job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost"


def test_migrations_match_the_models(tmp_path):
    """models.py and migrations/ must not drift: the migrated schema is what the models describe."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from slmtune.service.models import Base

    store = make_store(tmp_path)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"version_table": "slm_alembic_version"}),
                                Base.metadata)
    assert diff == []


def test_job_creation_is_a_plain_function(tmp_path, tiny_llama_dir):
    """create_job needs a Service and a tenant, no HTTP: the router only translates."""
    import json

    from slmtune.http.errors import ApiError
    from slmtune.service.auth import create_key
    from slmtune.service.core import Service
    from slmtune.service.files import check_upload
    from slmtune.service.jobs import create_job
    from slmtune.service.models import File
    from slmtune.service.schemas import JobCreate
    from slmtune.service.settings import Settings
    from tests.service.conftest import training_rows

    service = Service(Settings(home=tmp_path / "home", models={"tiny": str(tiny_llama_dir)}, workers=0))
    service.store.migrate()
    create_key(service.store, "acme")
    tenant = service.store.tenant_by_name("acme")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in training_rows(12)))
    fmt, n = check_upload(path.read_bytes(), path)
    service.store.add_file(File(id="file-1", tenant_id=tenant.id, filename="train.jsonl", purpose="fine-tune",
                                bytes=path.stat().st_size, path=str(path), format=fmt, n_examples=n, created_at=0.0))
    job = create_job(service, tenant, JobCreate(model="tiny", training_file="file-1", suffix="x"))
    assert job.status == "queued" and service.store.get_job(job.id, tenant.id) is not None
    assert job.resolved["recipe"]["data"]["train"] == str(path)
    with pytest.raises(ApiError) as err:
        create_job(service, tenant, JobCreate(model="tiny", training_file="file-1", suffix="bad\n"))
    assert err.value.param == "suffix"
