"""/healthz, /readyz and /metrics on both servers (slmtune/http/health.py)."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

from slmtune.service.serving import ServingGuard
from tests.service.conftest import start_service, training_rows


def families(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_the_fine_tuning_service(tmp_path, tiny_llama_dir, upload):
    service = start_service(tmp_path / "home", tiny_llama_dir, workers=0)
    try:
        ready = httpx.get(service.url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "engine": "ok"}
        client = service.client("acme")
        f = upload(client, training_rows(12))
        client.fine_tuning.jobs.create(model="tiny", training_file=f.id)
        found = families(service.url)
        assert {s.labels["status"]: s.value for s in found["slmtune_jobs"].samples} == {"queued": 1}
        assert [(s.labels["tenant"], s.value) for s in found["slmtune_queued_jobs"].samples] == [("acme", 1)]
        assert "slmtune_trained_tokens" in found and "slmtune_job_duration_seconds" in found
        # readiness follows the database: a store at an older revision is not ready
        store = service.app.state.service.store
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE slm_alembic_version SET version_num = 'old'")
        not_ready = httpx.get(service.url + "/readyz", timeout=30)
        assert not_ready.status_code == 503 and "old" in not_ready.json()["checks"]["database"]
    finally:
        service.stop()


def test_a_base_that_fails_to_load_leaves_the_fine_tuning_api_up_and_is_retried(tmp_path, tiny_llama_dir, upload):
    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"damaged")  # a half-copied or corrupted model volume
    service = start_service(tmp_path / "home", broken, workers=0, engine_retry_seconds=0.5)
    try:
        assert httpx.get(service.url + "/healthz", timeout=30).status_code == 200
        ready = httpx.get(service.url + "/readyz", timeout=30)
        # Ready: this replica serves the fine-tuning API; what does not work is named.
        assert ready.status_code == 200 and ready.json()["checks"]["engine"] == "ok"
        assert "`tiny` failed to load" in ready.json()["degraded"]["engine"]
        client = service.client("acme")
        f = upload(client, training_rows(12))
        assert [x.id for x in client.files.list().data] == [f.id]  # the fine-tuning API answers
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        headers = {"Authorization": f"Bearer {client.api_key}"}
        refused = httpx.post(service.url + "/v1/chat/completions", timeout=30, headers=headers, json=chat)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert str(broken) not in refused.text  # the reason (paths) is the operator's, not the tenants'
        assert httpx.post(service.url + "/v1/chat/completions", timeout=30, json=chat).status_code == 401
        # The volume is repaired: the retry loads the base, and chat answers.
        shutil.copy(tiny_llama_dir / "model.safetensors", broken / "model.safetensors")
        deadline = time.monotonic() + 120
        while "degraded" in (ready := httpx.get(service.url + "/readyz", timeout=30).json()):
            assert time.monotonic() < deadline, ready
            time.sleep(0.2)
        answered = httpx.post(service.url + "/v1/chat/completions", timeout=60, headers=headers, json=chat)
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["message"]["content"] is not None
    finally:
        service.stop()


def test_with_no_serving_app_a_websocket_is_closed_not_crashed():
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    asyncio.run(ServingGuard(service=None, inner=None)({"type": "websocket", "path": "/v1/chat/completions"},
                                                        receive, send))
    assert sent == [{"type": "websocket.close", "code": 1013}]
