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
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from slmtune.http.errors import error_body, install_error_handlers
from slmtune.serve.app import create_app
from slmtune.serve.engine import Engine
from slmtune.service.core import Service
from slmtune.service.routes import console, files, jobs, models
from slmtune.service.serving import ServingGuard
from slmtune.service.settings import Settings
from slmtune.service.store import new_id


def create_service_app(settings: Settings, *, engine=None) -> FastAPI:
    """The service app; on startup: migrations, the serving engine (the first of settings.models,
    unless `engine` is given or settings.serve is false) and settings.workers worker processes."""
    service = Service(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(service.store.migrate)
        (settings.service_dir / "files").mkdir(parents=True, exist_ok=True)
        started_engine = None
        if service.engine is None and settings.serve and settings.models:
            name, path = next(iter(settings.models.items()))
            service.engine = started_engine = await asyncio.to_thread(Engine.load, path, {}, base_name=name,
                                                                         dtype=settings.serve_dtype)
        if service.engine is not None:
            # The serving app's admin routes are never reachable through the guard; its token is random.
            serve_app = create_app(service.engine, admin_token=new_id("admin", 24))
            app.mount("/", ServingGuard(service, serve_app))
            service.engine.start()
        service.start_workers()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop_workers)
            if started_engine is not None:
                await asyncio.to_thread(started_engine.stop)
            service.store.close()

    app = FastAPI(title="slmtune fine-tuning service", lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)

    @app.middleware("http")
    async def _upload_limit(request: Request, call_next):
        if request.method == "POST" and request.url.path == "/v1/files":
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
                return JSONResponse(error_body(f"The file is larger than the limit of {settings.max_upload_bytes} "
                                               "bytes.", "invalid_request_error", "file", "file_too_large"),
                                    status_code=413)
        return await call_next(request)

    for module in (files, jobs, models, console):
        app.include_router(module.router)
    console.mount_static(app)
    return app
