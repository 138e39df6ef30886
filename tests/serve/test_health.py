"""/healthz, /readyz and /metrics on both servers (slmtune/http/health.py)."""

from __future__ import annotations

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.test_serve import HELLO


def families(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_the_serving_server(served):
    assert httpx.get(served.url + "/healthz", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(served.url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["checks"] == {"engine": "ok"}
    served.client().chat.completions.create(model=served.base_name, messages=HELLO, max_tokens=3, temperature=0)
    found = families(served.url)
    assert sum(s.value for s in found["slmtune_engine_requests"].samples) >= 1
    assert any(s.labels.get("route") == "/v1/chat/completions" and s.labels.get("status") == "200"
               for s in found["slmtune_http_request_seconds"].samples)
