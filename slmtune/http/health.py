"""Health, readiness and Prometheus metrics for both servers (`slmtune serve`, `slmtune api`).

    GET /healthz   200 while the process serves HTTP (liveness)
    GET /readyz    200 when every readiness check passes, else 503 naming the failing ones
    GET /metrics   Prometheus text format (prometheus-client)

`install_health(app, checks, collect)` adds the three routes and an HTTP middleware that times every
request (`slmtune_http_request_seconds` by method, route and status). `checks` maps a name to a
function returning None (ready) or a reason; `collect` returns the app's own metric families
(engine batch sizes, jobs by status, ...), built fresh on each scrape from the state they describe,
so no counter can drift from the store or the engine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import Metric

ReadinessCheck = Callable[[], str | None]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class FamiliesCollector:
    """A prometheus-client collector around a function that returns metric families."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def install_health(app: FastAPI, checks: dict[str, ReadinessCheck],
                   collect: Callable[[], Iterable[Metric]] | None = None) -> CollectorRegistry:
    """Add /healthz, /readyz, /metrics and request timing to `app`; returns its metrics registry."""
    registry = CollectorRegistry()
    latency = Histogram("slmtune_http_request_seconds", "HTTP request latency", ["method", "route", "status"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    if collect is not None:
        registry.register(FamiliesCollector(collect))

    @app.middleware("http")
    async def _time_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        # The route's template, not the path: ids in paths would make one series per job.
        name = getattr(route, "path", None) or "unmatched"
        latency.labels(request.method, name, str(response.status_code)).observe(time.perf_counter() - started)
        return response

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        results = {}
        for name, check in checks.items():
            try:
                results[name] = await asyncio.to_thread(check)
            except Exception as err:  # noqa: BLE001 - a failing check is a reason, not a 500
                results[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        failing = {name: reason for name, reason in results.items() if reason}
        body = {"status": "ready" if not failing else "not ready", "checks": {n: r or "ok" for n, r in results.items()}}
        return JSONResponse(body, status_code=503 if failing else 200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        data = await asyncio.to_thread(generate_latest, registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return registry
