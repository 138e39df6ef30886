"""Health, readiness and Prometheus metrics for both servers (`slmtune serve`, `slmtune api`).

    GET /healthz   200 while the process serves HTTP (liveness)
    GET /readyz    200 when every readiness check passes, else 503 naming the failing ones; what does
                   not work while the app serves on is listed under "degraded"
    GET /metrics   Prometheus text format (prometheus-client)

`install_health(app, checks, collect)` adds the three routes and an ASGI middleware that times every
request (`slmtune_http_request_seconds` by method, route and status). `checks` maps a name to a
function returning None (ready) or a reason; `collect` returns the app's own metric families
(engine batch sizes, jobs by status, ...), built fresh on each scrape from the state they describe,
so no counter can drift from the store or the engine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

from fastapi import FastAPI
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


class RequestTimer:
    """Pure ASGI middleware observing each HTTP request's latency by method, route template and status.

    Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware stands between the app and the
    server's `receive`, so `Request.is_disconnected()` never sees a client hang up, and abandoned
    non-streamed generations would run to the end (tests/serve/test_limits.py)."""

    def __init__(self, app, latency: Histogram):
        self.app = app
        self.latency = latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client sees if the app fails before starting a response

        async def send_timed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            # The route's template, not the path: ids in paths would make one series per job.
            name = getattr(scope.get("route"), "path", None) or "unmatched"
            self.latency.labels(scope["method"], name, str(status)).observe(time.perf_counter() - started)


def install_health(app: FastAPI, checks: dict[str, ReadinessCheck],
                   collect: Callable[[], Iterable[Metric]] | None = None,
                   degraded: dict[str, ReadinessCheck] | None = None) -> CollectorRegistry:
    """Add /healthz, /readyz, /metrics and request timing to `app`; returns its metrics registry.
    `degraded` checks name what does not work while the app still serves: /readyz lists their
    reasons under "degraded" and stays 200."""
    registry = CollectorRegistry()
    latency = Histogram("slmtune_http_request_seconds", "HTTP request latency", ["method", "route", "status"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    if collect is not None:
        registry.register(FamiliesCollector(collect))

    app.add_middleware(RequestTimer, latency=latency)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    async def reasons(named_checks: dict[str, ReadinessCheck]) -> dict[str, str | None]:
        results = {}
        for name, check in named_checks.items():
            try:
                results[name] = await asyncio.to_thread(check)
            except Exception as err:  # noqa: BLE001 - a failing check is a reason, not a 500
                results[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return results

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        results = await reasons(checks)
        failing = {name: reason for name, reason in results.items() if reason}
        body = {"status": "ready" if not failing else "not ready", "checks": {n: r or "ok" for n, r in results.items()}}
        notes = {name: reason for name, reason in (await reasons(degraded or {})).items() if reason}
        if notes:
            body["degraded"] = notes
        return JSONResponse(body, status_code=503 if failing else 200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        data = await asyncio.to_thread(generate_latest, registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return registry
