"""The service treats every tenant as possibly hostile (#16): quotas with 429s, files in use, metadata
bounds, fair claims across tenants, safe defaults (headers, no public schema, keys list/revoke)."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx2 as httpx
import pytest

from slmtune.service.models import Job
from slmtune.service.settings import Settings
from slmtune.service.store import Store, new_id
from tests.service.conftest import BASE, start_service, training_rows
from tests.service.test_service import bad_request


@pytest.fixture(scope="module")
def strict_service(tmp_path_factory, tiny_llama_dir):
    """No workers (jobs stay queued), small quotas."""
    service = start_service(tmp_path_factory.mktemp("limits-home"), tiny_llama_dir, workers=0, max_queued_jobs=2,
                            max_files=4, serve=False, max_upload_bytes=20000)
    yield service
    service.stop()


def test_queued_jobs_per_tenant_are_bounded_with_a_429(strict_service, upload):
    client = strict_service.client("flood")
    f = upload(client, training_rows(12))
    for _ in range(2):
        client.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    body = bad_request(lambda: client.fine_tuning.jobs.create(model=BASE, training_file=f.id), status=429)
    assert body["code"] == "too_many_jobs" and body["type"] == "rate_limit_error"
    other = strict_service.client("calm")  # another tenant is not affected
    g = upload(other, training_rows(12))
    assert other.fine_tuning.jobs.create(model=BASE, training_file=g.id).status == "queued"


def test_a_file_used_by_an_unfinished_job_cannot_be_deleted(strict_service, upload):
    client = strict_service.client("keeper")
    f = upload(client, training_rows(12))
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    body = bad_request(lambda: client.files.delete(f.id), status=409)
    assert body["code"] == "file_in_use" and job.id in body["message"]
    client.fine_tuning.jobs.cancel(job.id)
    assert client.files.delete(f.id).deleted


def test_files_per_tenant_are_bounded(strict_service, upload):
    client = strict_service.client("hoarder")
    for _ in range(4):
        upload(client, training_rows(12))
    body = bad_request(lambda: upload(client, training_rows(12)), status=429)
    assert body["code"] == "too_many_files"


@pytest.mark.parametrize("metadata", [{f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}])
def test_metadata_is_bounded_as_openai_bounds_it(strict_service, upload, metadata):
    client = strict_service.client("meta")
    f = upload(client, training_rows(12))
    body = bad_request(lambda: client.fine_tuning.jobs.create(model=BASE, training_file=f.id, metadata=metadata))
    assert body["code"] == "invalid_metadata"


def test_console_headers_and_no_public_schema(strict_service):
    page = httpx.get(strict_service.url + "/", timeout=30)
    assert page.status_code == 200
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(strict_service.url + path, timeout=30).status_code in (401, 404)


def test_names_with_a_trailing_newline_are_refused():
    from slmtune.service.auth import TENANT_PATTERN
    from slmtune.serve.adapters import NAME_PATTERN

    assert TENANT_PATTERN.fullmatch("acme") and not TENANT_PATTERN.fullmatch("acme\n")
    assert NAME_PATTERN.fullmatch("beta") and not NAME_PATTERN.fullmatch("beta\n")


def test_keys_can_be_listed_and_revoked(tmp_path):
    db = f"sqlite:///{tmp_path / 'service.db'}"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "slmtune.cli", "keys", *args, "--db", db], capture_output=True,
                              text=True, timeout=120)

    key = cli("create", "--tenant", "team").stdout.strip().splitlines()[-1]
    listed = cli("list")
    assert listed.returncode == 0 and " team " in listed.stdout
    key_id = int(listed.stdout.splitlines()[1].split()[0])
    store = Store(db)
    from slmtune.service.auth import tenant_from_header

    assert tenant_from_header(store, f"Bearer {key}") is not None
    assert cli("revoke", str(key_id)).returncode == 0
    assert tenant_from_header(store, f"Bearer {key}") is None
    assert cli("revoke", str(key_id)).returncode == 2


def test_claims_go_round_robin_across_tenants(tmp_path):
    """One tenant queues many jobs, another one job later: the other's job is claimed second, not last."""
    store = Store(f"sqlite:///{tmp_path / 'service.db'}")
    store.migrate()
    for name in ("flood", "calm"):
        store.create_key(name, name * 8)
    tenants = {name: store.tenant_by_name(name) for name in ("flood", "calm")}

    def add(tenant):
        job = Job(id=new_id("ftjob", 8), tenant_id=tenants[tenant].id, model="m", base_path="m",
                  training_file="file-x", seed=1, method="lora", hyperparameters={}, resolved={}, status="queued",
                  result_files=[], run_dir="/nowhere", attempts=0, created_at=time.time())
        store.create_job(job, ["queued"])
        return job.id

    flood = [add("flood") for _ in range(5)]
    calm = add("calm")
    order = [store.claim(f"w{i}", timeout=30).id for i in range(3)]
    assert order == [flood[0], calm, flood[1]]


def test_a_fresh_service_offers_the_catalog_default_model(monkeypatch):
    for key in ("SLMTUNE_MODELS",):
        monkeypatch.delenv(key, raising=False)
    assert Settings().models == {"smollm2-135m-instruct": "smollm2-135m-instruct"}


def chunked(total: int, piece: int = 64 * 1024):
    """A request body without Content-Length (chunked transfer encoding): the opening of a well-formed
    multipart upload with boundary `b`, then a file of `total` bytes that never ends. Well-formed, so
    that only the size limit can refuse it (a malformed body could be refused sooner as a 400, by
    whichever comes first: the multipart parser or the byte count)."""
    yield (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
           b"Content-Type: application/octet-stream\r\n\r\n")
    sent = 0
    while sent < total:
        yield b"x" * min(piece, total - sent)
        sent += piece


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(strict_service):
    response = httpx.post(strict_service.url + "/v1/files", content=chunked(200 * 2**20),
                          headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=60)
    assert response.status_code == 401


def test_a_chunked_oversize_upload_is_cut_off_at_the_limit(strict_service):
    """No Content-Length: the body is counted as it arrives and refused at the limit (20,000 bytes
    here), long before the 200 MB the client would send; nothing is stored."""
    client = strict_service.client("big")
    before = len(list(client.files.list()))
    response = httpx.post(strict_service.url + "/v1/files", content=chunked(200 * 2**20),
                          headers={"Content-Type": "multipart/form-data; boundary=b",
                                   "Authorization": f"Bearer {strict_service.key('big')}"}, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert len(list(client.files.list())) == before


def test_concurrent_first_migrations_on_sqlite_do_not_race(tmp_path):
    """Four `slmtune keys create` on a fresh home at once: every one succeeds."""
    db = f"sqlite:///{tmp_path / 'fresh' / 'service.db'}"
    procs = [subprocess.Popen([sys.executable, "-m", "slmtune.cli", "keys", "create", "--tenant", f"t{i}", "--db", db],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results


def test_a_worker_that_dies_is_replaced(tmp_path, tiny_llama_dir):
    from tests.service.test_service import wait_until

    service = start_service(tmp_path / "home", tiny_llama_dir, workers=1, serve=False)
    try:
        core = service.app.state.service
        wait_until(lambda: len(core.workers) == 1 and core.workers[0].poll() is None, timeout=30)
        first = core.workers[0]
        first.kill()
        wait_until(lambda: core.workers[0] is not first and core.workers[0].poll() is None, timeout=30)
    finally:
        service.stop()


def test_a_worker_outlives_a_database_outage(tmp_path):
    """The claim loop meets a database error: the worker waits and tries again instead of exiting."""
    import threading

    from sqlalchemy.exc import OperationalError

    from slmtune.service.worker import Worker

    store = Store(f"sqlite:///{tmp_path / 'service.db'}")
    store.migrate()
    worker = Worker(Settings(home=tmp_path, poll_interval=0.05), store, "w")
    calls = {"n": 0}
    real_claim = store.claim

    def flaky_claim(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OperationalError("SELECT", {}, Exception("database is restarting"))
        if calls["n"] >= 4:
            worker.stopping.set()
        return real_claim(*args, **kwargs)

    store.claim = flaky_claim
    thread = threading.Thread(target=worker.run_forever)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and calls["n"] >= 4


def test_a_fresh_api_accepts_a_job_on_the_default_model(tmp_path, monkeypatch, upload):
    """`slmtune api` with no --models: the official client's first job on the README's default model
    is accepted (the model is pulled when the job trains, as `slmtune train` pulls it)."""
    from slmtune.service.app import create_service_app
    from slmtune.service.auth import create_key
    from tests.serve.conftest import ServerThread

    monkeypatch.delenv("SLMTUNE_MODELS", raising=False)
    settings = Settings(home=tmp_path / "home", workers=0, serve=False)
    app = create_service_app(settings)
    server = ServerThread(app).start()
    try:
        from openai import OpenAI

        key = create_key(app.state.service.store, "newcomer")
        client = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        f = upload(client, training_rows(12))
        job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=f.id)
        assert job.status == "queued" and job.model == "smollm2-135m-instruct"
        assert "smollm2-135m-instruct" in [m.id for m in client.models.list()]
    finally:
        server.stop()


@pytest.mark.parametrize("raw,param", [
    (b'"n_epochs": 1e400', "n_epochs"),      # JSON's overflow to infinity
    (b'"batch_size": NaN', "batch_size"),
    (b'"learning_rate_multiplier": -Infinity', "learning_rate_multiplier"),
])
def test_non_finite_hyperparameters_are_400s(strict_service, upload, raw, param):
    client = strict_service.client("numbers")
    f = upload(client, training_rows(12))
    body = (b'{"model": "tiny", "training_file": "' + f.id.encode() + b'", "method": {"type": "supervised", '
            b'"supervised": {"hyperparameters": {' + raw + b'}}}}')
    response = httpx.post(strict_service.url + "/v1/fine_tuning/jobs", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {strict_service.key('numbers')}",
                                   "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert param in (response.json()["error"]["param"] or "")
