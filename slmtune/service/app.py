"""The fine-tuning API, shaped like OpenAI's: `slmtune api` serves `create_service_app(Settings())`.

    POST   /v1/files                          multipart: file (JSONL) + purpose=fine-tune
    GET    /v1/files                          ?purpose=&after=&limit=
    GET    /v1/files/{id}  DELETE /v1/files/{id}  GET /v1/files/{id}/content
    POST   /v1/fine_tuning/jobs               JobCreate
    GET    /v1/fine_tuning/jobs               ?after=&limit=
    GET    /v1/fine_tuning/jobs/{id}
    POST   /v1/fine_tuning/jobs/{id}/cancel | /pause | /resume
    GET    /v1/fine_tuning/jobs/{id}/events | /checkpoints    ?after=&limit=
    GET    /v1/models, /v1/models/{id}         base models and the tenant's fine-tuned models
    POST   /v1/chat/completions, /v1/completions   the serving engine (slmtune/serve), for the base
                                               model and the tenant's succeeded fine-tuned models
    GET    /healthz /readyz /metrics          liveness, readiness (database migrated, engine loaded),
                                               Prometheus metrics (slmtune/http/health.py); no key
    GET    /  (+ /static/...)  /v1/slmtune/methods  /v1/slmtune/auto_hyperparameters  /v1/slmtune/plan
                                               the web console and its helpers

Every route needs `Authorization: Bearer <key>` (`slmtune keys create --tenant NAME`); a tenant
sees only its own files, jobs, events, checkpoints and models: another tenant's id is a 404.
Errors are {"error": {"message", "type", "param", "code"}} (slmtune/http/errors.py).

Where things live: routes/ (one APIRouter per resource), core.py (the Service the routes share),
jobs.py and files.py (what creating a job or storing an upload means), serving.py (the engine
behind tenant checks), store.py (every database operation), worker.py (runs the jobs).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from slmtune.http.errors import ApiError, install_error_handlers
from slmtune.http.health import install_health
from slmtune.serve.app import create_app, engine_metrics
from slmtune.service.core import Service
from slmtune.service.deps import tenant_of
from slmtune.service.engines import load_engine
from slmtune.service.files import too_large
from slmtune.service.routes import console, files, graders, jobs, models
from slmtune.service.serving import ServingGuard
from slmtune.service.settings import Settings
from slmtune.service.store import new_id

log = logging.getLogger(__name__)
ENGINE_RETRY_MAX_SECONDS = 600


# The console is same-origin script and CSS only; nothing may frame it or sniff types.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class UploadTooLarge(Exception):
    pass


class UploadGuard:
    """In front of `POST /v1/files`: the API key is checked before any of the body is read, and the
    body is cut off at the size limit as it arrives (with or without Content-Length), so neither
    an anonymous nor an oversize upload is ever received in full."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/files":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = self.service.settings.max_upload_bytes + 64 * 1024  # the multipart framing around the file
        try:
            await asyncio.to_thread(tenant_of, self.service, headers.get("authorization"))
        except ApiError as err:
            return await err.response()(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await too_large(self.service.settings.max_upload_bytes).response()(scope, receive, send)
        received, started, cut = 0, False, False

        async def counted_receive():
            nonlocal received, cut
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                cut = True
                raise UploadTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            if cut:  # the app's answer to a body cut short is replaced by the 413 below
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except UploadTooLarge:
            pass
        if cut and not started:
            await too_large(self.service.settings.max_upload_bytes).response()(scope, receive, send)


def engine_problem(service: Service) -> str | None:
    """Why the serving engine is not ready (None: ready, or this service does not serve). A base that
    failed to load is not one: the replica serves the fine-tuning API meanwhile (engine_degraded)."""
    if not service.settings.serve or service.engine_error is not None:
        return None
    if service.engine is None:
        return "the base model is still loading"
    return None if service.engine.running else "the engine thread is not running"


def engine_degraded(service: Service) -> str | None:
    """Why chat requests get a 503 while the rest of the API serves: the base failed to load (retried)."""
    return service.engine_error


def serve_engine(service: Service, guard: ServingGuard, engine) -> None:
    """Start `engine` and route chat requests to it through `guard`."""
    engine.start()
    service.engine, service.engine_error = engine, None
    # The serving app's admin routes are never reachable through the guard; its token is random.
    guard.inner = create_app(engine, admin_token=new_id("admin", 24))


async def load_and_serve(service: Service, guard: ServingGuard, name: str, path: str) -> bool:
    """Load the base `name` and serve it; False (the reason in service.engine_error) when it fails."""
    try:
        engine = await asyncio.to_thread(load_engine, service.settings, name, path)
    except Exception as err:  # noqa: BLE001 - a broken base must not take the fine-tuning API down with it
        log.exception("the serving engine for %s did not load; chat requests get 503 until it does", name)
        service.engine_error = f"The serving engine for `{name}` failed to load: {type(err).__name__}: {err}"
        return False
    serve_engine(service, guard, engine)
    return True


async def retry_engine(service: Service, guard: ServingGuard, name: str, path: str) -> None:
    """Try the failed base again, settings.engine_retry_seconds apart, doubling up to ten minutes."""
    delay = service.settings.engine_retry_seconds
    while True:
        await asyncio.sleep(delay)
        if await load_and_serve(service, guard, name, path):
            log.info("the serving engine for %s loaded", name)
            return
        delay = min(ENGINE_RETRY_MAX_SECONDS, delay * 2)


def service_metrics(service: Service) -> list:
    """Jobs by status, queue depth per tenant, job durations and trained tokens (from the store), and
    the serving engine's counters, as Prometheus families built at each scrape."""
    store = service.store
    jobs = GaugeMetricFamily("slmtune_jobs", "Fine-tuning jobs by status", labels=["status"])
    for status, n in store.job_counts().items():
        jobs.add_metric([status], n)
    queued = GaugeMetricFamily("slmtune_queued_jobs", "Queued jobs per tenant", labels=["tenant"])
    for tenant, n in store.queued_by_tenant().items():
        queued.add_metric([tenant], n)
    finished, seconds, tokens = store.finished_job_stats()
    duration = SummaryMetricFamily("slmtune_job_duration_seconds", "Creation to finish of finished jobs",
                                   count_value=finished, sum_value=seconds)
    trained = CounterMetricFamily("slmtune_trained_tokens", "Tokens trained by all jobs")
    trained.add_metric([], tokens)
    families = [jobs, queued, duration, trained]
    if service.engine is not None:
        families += engine_metrics(service.engine)
    return families


def create_service_app(settings: Settings, *, engine=None) -> FastAPI:
    """The service app; on startup: migrations, the serving engine (the first of settings.models,
    unless `engine` is given or settings.serve is false) and settings.workers worker processes."""
    service = Service(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(service.store.migrate)
        (settings.service_dir / "files").mkdir(parents=True, exist_ok=True)
        given_engine, retrying = service.engine, None
        if given_engine is not None or (settings.serve and settings.models):
            guard = ServingGuard(service, None)  # its serving app is set once the engine runs
            app.mount("/", guard)
            base = next(iter(settings.models.items()), None)  # (name, path) of the first model
            if given_engine is not None:
                serve_engine(service, guard, given_engine)
            elif not await load_and_serve(service, guard, *base):
                retrying = asyncio.create_task(retry_engine(service, guard, *base))
        service.start_workers()
        try:
            yield
        finally:
            if retrying is not None:
                retrying.cancel()
            await asyncio.to_thread(service.stop_workers)
            if service.engine is not None and service.engine is not given_engine:
                await asyncio.to_thread(service.engine.stop)
            service.store.close()

    # The OpenAPI schema and its pages describe every route to anyone; off unless asked for.
    docs = settings.public_docs
    app = FastAPI(title="slmtune fine-tuning service", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.service = service
    install_error_handlers(app)

    app.add_middleware(UploadGuard, service=service)

    @app.middleware("http")
    async def _security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    install_health(app, {"database": service.store.migration_problem, "engine": lambda: engine_problem(service)},
                   lambda: service_metrics(service), degraded={"engine": lambda: engine_degraded(service)})

    for module in (files, jobs, graders, models, console):
        app.include_router(module.router)
    console.mount_static(app)
    return app
