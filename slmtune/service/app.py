"""The fine-tuning API, shaped like OpenAI's; routes only check input and call the store.

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
    GET    /  (+ /static/...)  /v1/slmtune/auto_hyperparameters  /v1/slmtune/plan   the web console (console.py)

Every route needs `Authorization: Bearer <key>` (`slmtune keys create --tenant NAME`); a tenant
sees only its own files, jobs, events, checkpoints and models: another tenant's id is a 404.
Errors are {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, File as FileParam, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from slmtune.serve.adapters import NAME_PATTERN
from slmtune.serve.app import ApiError, error_body, _validation_error
from slmtune.service import auth, hyper
from slmtune.service.models import File, Job, Tenant
from slmtune.service.settings import Settings
from slmtune.service.store import Store, new_id

SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,18}$")
MIN_TRAINING_EXAMPLES = 10


# --- bodies and answers ------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Supervised(_Body):
    hyperparameters: dict[str, Any] | None = None


class MethodSpec(_Body):
    type: Literal["supervised"]
    supervised: Supervised | None = None


class JobCreate(_Body):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: MethodSpec | None = None
    hyperparameters: dict[str, Any] | None = None  # OpenAI's older top-level form
    slmtune_method: Literal["lora", "qlora", "dora", "full"] = "lora"  # extension: how slmtune trains


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None

    @classmethod
    def of(cls, f: File) -> "FilePublic":
        return cls(id=f.id, bytes=f.bytes, created_at=int(f.created_at), filename=f.filename, purpose=f.purpose)


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict
    method: dict
    trained_tokens: int | None
    error: dict | None
    user_provided_suffix: str | None
    seed: int
    metadata: dict | None
    integrations: list = []
    estimated_finish: int | None = None
    slmtune_method: str

    @classmethod
    def of(cls, j: Job, tenant: Tenant) -> "JobPublic":
        hp = {k: j.resolved[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        return cls(id=j.id, model=j.model, created_at=int(j.created_at),
                   finished_at=int(j.finished_at) if j.finished_at else None, fine_tuned_model=j.fine_tuned_model,
                   organization_id=tenant.name, result_files=list(j.result_files or []), status=j.status,
                   training_file=j.training_file, validation_file=j.validation_file, hyperparameters=hp,
                   method={"type": "supervised", "supervised": {"hyperparameters": hp}},
                   trained_tokens=j.trained_tokens, error=j.error, user_provided_suffix=j.suffix, seed=j.seed,
                   metadata=j.metadata_, slmtune_method=j.method)


def _event_public(e) -> dict:
    return {"object": "fine_tuning.job.event", "id": e.id, "created_at": int(e.created_at), "level": e.level,
            "message": e.message, "type": e.type, "data": e.data}


def _checkpoint_public(c, job: Job) -> dict:
    name = job.resolved["fine_tuned_model"]
    return {"object": "fine_tuning.job.checkpoint", "id": c.id, "created_at": int(c.created_at),
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{c.step}", "step_number": c.step,
            "metrics": c.metrics, "fine_tuning_job_id": job.id}


def _page(items: list, has_more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No {what} with id `{ident}` exists.", param=param, code=f"{what.replace(' ', '_')}_not_found")


# --- uploads -----------------------------------------------------------------------------------
def check_filename(name: str | None) -> str:
    if not name or not name.strip():
        raise ApiError(400, "The uploaded file needs a file name.", param="file", code="invalid_filename")
    if "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or len(name) > 255:
        raise ApiError(400, f"File name {name!r} is not allowed: give a plain name without directories.",
                       param="file", code="invalid_filename")
    return name


def check_upload(data: bytes, tmp: Path) -> tuple[str | None, int]:
    """Validate a fine-tune upload written at `tmp`: (format, n_examples) or an ApiError."""
    from slmtune.data.validate import validate_file

    if not data.strip():
        raise ApiError(400, "The file is empty.", param="file", code="empty_file")
    report = validate_file(tmp, min_examples=1)
    errors = [i for i in report.errors if i.code != "too_few_examples"]
    if errors:
        shown = "; ".join(f"line {i.line}: {i.code}: {i.message}" if i.line else f"{i.code}: {i.message}"
                          for i in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        code = "invalid_encoding" if errors[0].code == "invalid_encoding" else "invalid_file_format"
        raise ApiError(400, f"Invalid file format for fine-tuning: {shown}{more}", param="file", code=code)
    if report.n_examples == 0:
        raise ApiError(400, "The file has no examples.", param="file", code="invalid_n_examples")
    return report.format, report.n_examples


# --- the serving engine, behind tenant checks --------------------------------------------------
class ServingGuard:
    """ASGI wrapper of the slmtune/serve app: checks the key and the body's `model` (a base model or
    one of the tenant's succeeded fine-tuned models, registered with the engine on first use)."""

    def __init__(self, service: "Service", inner):
        self.service, self.inner = service, inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        path = scope["path"]
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return await _send_error(send, ApiError(404, f"Unknown path {path}", code="not_found"))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        tenant = await asyncio.to_thread(auth.tenant_from_header, self.service.store, headers.get("authorization"))
        if tenant is None:
            return await _send_error(send, _unauthorized())
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None
        if isinstance(model, str):
            try:
                await asyncio.to_thread(self.service.ensure_served, tenant, model)
            except ApiError as err:
                return await _send_error(send, err)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.inner(scope, replay, send)


async def _send_error(send, err: ApiError) -> None:
    payload = json.dumps(error_body(err.message, err.type, err.param, err.code)).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _unauthorized() -> ApiError:
    return ApiError(401, "Incorrect API key provided. Create one with `slmtune keys create --tenant NAME` and send "
                         "`Authorization: Bearer <key>`.", code="invalid_api_key")


def _term_with_parent() -> None:
    """Embedded workers get SIGTERM (checkpoint, requeue, exit) if the API server dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


class Service:
    """State shared by the routes: settings, store, serving engine, worker processes."""

    def __init__(self, settings: Settings, engine=None):
        self.settings = settings
        self.store = Store(settings.db_url)
        self.engine = engine
        self.workers: list[subprocess.Popen] = []

    def ensure_served(self, tenant: Tenant, name: str) -> None:
        engine = self.engine
        if engine is not None and name == engine.base_name:
            return
        job = self.store.job_for_model(name)
        if job is None or job.tenant_id != tenant.id:
            if name in self.settings.models:
                raise ApiError(404, f"The base model `{name}` is offered for fine-tuning but not served here.",
                               param="model", code="model_not_found")
            raise ApiError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        if engine is None or job.model != engine.base_name:
            raise ApiError(404, f"The model `{name}` is fine-tuned from `{job.model}`, which this server does not "
                                "serve.", param="model", code="model_not_found")
        if job.method == "full":
            raise ApiError(400, f"`{name}` is a full fine-tune (a whole model); this server serves adapters "
                                "(lora, dora, qlora) on its base model. Serve it with `slmtune serve --model`.",
                           param="model", code="model_not_servable")
        if name not in engine.registry:
            try:
                engine.add_adapter(name, job.run_dir)
            except Exception as err:  # noqa: BLE001 - e.g. registered concurrently
                if name not in engine.registry:
                    raise ApiError(500, f"Cannot load `{name}`: {err}", type="server_error",
                                   code="adapter_load_failed") from None

    def start_workers(self) -> None:
        env = dict(os.environ)
        for key, value in self.settings.model_dump(mode="json").items():
            if value is not None:
                env[f"SLMTUNE_{key.upper()}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        env["SLMTUNE_DB"] = self.settings.db_url
        for _ in range(self.settings.workers):
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "slmtune.cli", "worker"], env=env, stdin=subprocess.DEVNULL,
                preexec_fn=_term_with_parent if sys.platform.startswith("linux") else None))

    def stop_workers(self, timeout: float = 30) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.workers:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.workers.clear()


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
            from slmtune.serve.engine import Engine

            name, path = next(iter(settings.models.items()))
            service.engine = started_engine = await asyncio.to_thread(Engine.load, path, {}, base_name=name,
                                                                         dtype=settings.serve_dtype)
        if service.engine is not None:
            from slmtune.serve.app import create_app

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
    store = service.store

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        e = _validation_error(err)
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(error_body(str(err.detail), "invalid_request_error", None, code),
                            status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        return JSONResponse(error_body(f"The server had an error while processing your request: "
                                       f"{type(err).__name__}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _upload_limit(request: Request, call_next):
        if request.method == "POST" and request.url.path == "/v1/files":
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
                return JSONResponse(error_body(f"The file is larger than the limit of {settings.max_upload_bytes} "
                                               "bytes.", "invalid_request_error", "file", "file_too_large"),
                                    status_code=413)
        return await call_next(request)

    def tenant(request: Request) -> Tenant:
        found = auth.tenant_from_header(store, request.headers.get("authorization"))
        if found is None:
            raise _unauthorized()
        return found

    def own_job(job_id: str, t: Tenant) -> Job:
        job = store.get_job(job_id, t.id)
        if job is None:
            raise not_found("fine-tuning job", job_id)
        return job

    # --- files ----------------------------------------------------------------------------------
    @app.post("/v1/files")
    def upload(file: UploadFile = FileParam(...), purpose: str = Form(...), t: Tenant = Depends(tenant)):
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose {purpose!r} is not supported; use \"fine-tune\".", param="purpose",
                           code="invalid_purpose")
        filename = check_filename(file.filename)
        data = file.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, f"The file is larger than the limit of {settings.max_upload_bytes} bytes.",
                           param="file", code="file_too_large")
        file_id = new_id("file")
        files_dir = settings.service_dir / "files"
        files_dir.mkdir(parents=True, exist_ok=True)
        tmp = files_dir / f".{file_id}.tmp"
        final = files_dir / f"{file_id}.jsonl"
        try:
            tmp.write_bytes(data)
            fmt, n = check_upload(data, tmp)
            os.replace(tmp, final)
            row = File(id=file_id, tenant_id=t.id, filename=filename, purpose=purpose, bytes=len(data),
                       path=str(final), format=fmt, n_examples=n, created_at=time.time())
            try:
                store.add_file(row)
            except Exception:
                final.unlink(missing_ok=True)
                raise
        finally:
            tmp.unlink(missing_ok=True)
        return FilePublic.of(row)

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, after: str | None = None, limit: int = Query(100, ge=1, le=10000),
                   t: Tenant = Depends(tenant)):
        try:
            rows, more = store.list_files(t.id, purpose, after, limit)
        except LookupError:
            raise not_found("file", after, param="after") from None
        return _page([FilePublic.of(f).model_dump() for f in rows], more)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, t: Tenant = Depends(tenant)):
        f = store.get_file(t.id, file_id)
        if f is None:
            raise not_found("file", file_id)
        return FilePublic.of(f)

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, t: Tenant = Depends(tenant)):
        f = store.get_file(t.id, file_id)
        if f is None:
            raise not_found("file", file_id)
        try:
            data = Path(f.path).read_bytes()
        except OSError:
            raise not_found("file", file_id) from None
        return Response(data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, t: Tenant = Depends(tenant)):
        f = store.delete_file(t.id, file_id)
        if f is None:
            raise not_found("file", file_id)
        Path(f.path).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # --- jobs -----------------------------------------------------------------------------------
    def training_input(file_id: str | None, param: str, t: Tenant, minimum: int) -> File | None:
        if file_id is None:
            return None
        f = store.get_file(t.id, file_id)
        if f is None:
            raise ApiError(400, f"File `{file_id}` not found.", param=param, code="file_not_found")
        if f.purpose != "fine-tune":
            raise ApiError(400, f"File `{file_id}` has purpose {f.purpose!r}; upload it with purpose fine-tune.",
                           param=param, code="invalid_file_purpose")
        if f.n_examples < minimum:
            raise ApiError(400, f"{param.replace('_', ' ').capitalize()} `{file_id}` has {f.n_examples} example(s), "
                                f"but must have at least {minimum} examples.", param=param, code="invalid_n_examples")
        return f

    @app.post("/v1/fine_tuning/jobs")
    def create_job(body: JobCreate, t: Tenant = Depends(tenant)):
        if body.model not in settings.models:
            offered = ", ".join(settings.models) or "none"
            raise ApiError(400, f"Model `{body.model}` is not available for fine-tuning (offered: {offered}).",
                           param="model", code="model_not_available")
        if body.suffix is not None and not SUFFIX_PATTERN.match(body.suffix):
            raise ApiError(400, "suffix: use 1-18 letters, digits, '-' or '_'.", param="suffix", code="invalid_suffix")
        if body.metadata is not None and len(body.metadata) > 16:
            raise ApiError(400, "metadata: at most 16 keys.", param="metadata", code="invalid_metadata")
        train_file = training_input(body.training_file, "training_file", t, MIN_TRAINING_EXAMPLES)
        val_file = training_input(body.validation_file, "validation_file", t, 1)
        if val_file is not None and train_file.format != val_file.format:
            raise ApiError(400, f"validation file is {val_file.format} but the training file is {train_file.format}.",
                           param="validation_file", code="invalid_validation_file")
        requested = body.hyperparameters or {}
        if body.method is not None:
            if body.hyperparameters is not None:
                raise ApiError(400, "Give hyperparameters in method.supervised.hyperparameters only.",
                               param="hyperparameters", code="invalid_hyperparameters")
            requested = (body.method.supervised.hyperparameters if body.method.supervised else None) or {}
        try:
            resolved = hyper.resolve(requested, train_file.n_examples)
        except hyper.HyperparameterError as err:
            raise ApiError(400, str(err), param=err.param, code="invalid_hyperparameters") from None
        job_id = new_id("ftjob", 8)
        ft_name = f"ft:{body.model}:{t.name}:{body.suffix or ''}:{job_id}"
        if not NAME_PATTERN.match(ft_name):
            raise ApiError(400, f"The fine-tuned model name {ft_name!r} would be longer than 64 characters; use a "
                                "shorter suffix.", param="suffix", code="invalid_suffix")
        seed = body.seed if body.seed is not None else random.randrange(2**31)
        run_dir = settings.service_dir / "jobs" / job_id / "run"
        recipe = hyper.build_recipe(
            base=settings.models[body.model], method=body.slmtune_method, train_path=train_file.path,
            validation_path=val_file.path if val_file else None, resolved=resolved, seed=seed, run_dir=str(run_dir),
            n_examples=train_file.n_examples, save_every=settings.checkpoint_every, threads=settings.train_threads)
        from slmtune.config import RecipeError, recipe_from_dict

        try:
            recipe_from_dict(json.loads(json.dumps(recipe)), "job")
        except RecipeError as err:
            raise ApiError(400, f"Cannot train this job: {err}", code="invalid_request") from None
        job = Job(id=job_id, tenant_id=t.id, model=body.model, base_path=settings.models[body.model],
                  training_file=train_file.id, validation_file=val_file.id if val_file else None, suffix=body.suffix,
                  seed=seed, metadata_=body.metadata, method=body.slmtune_method, hyperparameters=requested,
                  resolved=resolved | {"recipe": recipe, "fine_tuned_model": ft_name}, status="queued", error=None,
                  result_files=[], run_dir=str(run_dir), attempts=0, created_at=time.time())
        steps = math.ceil(train_file.n_examples / resolved["batch_size"]) * resolved["n_epochs"]
        store.create_job(job, [
            f"Validating training file: {train_file.id}" + (f" and validation file: {val_file.id}" if val_file else ""),
            f"Files validated ({train_file.n_examples} training examples; {steps} steps with n_epochs="
            f"{resolved['n_epochs']}, batch_size={resolved['batch_size']}, learning_rate_multiplier="
            f"{resolved['learning_rate_multiplier']}), moving job to queued state"])
        return JobPublic.of(job, t)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100), t: Tenant = Depends(tenant)):
        try:
            rows, more = store.list_jobs(t.id, after, limit)
        except LookupError:
            raise not_found("fine-tuning job", after, param="after") from None
        return _page([JobPublic.of(j, t).model_dump() for j in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, t: Tenant = Depends(tenant)):
        return JobPublic.of(own_job(job_id, t), t)

    def transition(job_id: str, t: Tenant, to: str, allowed: tuple[str, ...], message: str) -> JobPublic:
        job = own_job(job_id, t)
        if not store.set_status(job_id, to, allowed_from=allowed, message=message):
            job = own_job(job_id, t)
            raise ApiError(400, f"Job {job_id} is {job.status}; it cannot be {to} now.", param=None,
                           code="invalid_job_state")
        return JobPublic.of(own_job(job_id, t), t)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel(job_id: str, t: Tenant = Depends(tenant)):
        return transition(job_id, t, "cancelled", ("validating_files", "queued", "running", "paused"),
                          "Job was cancelled")

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause(job_id: str, t: Tenant = Depends(tenant)):
        return transition(job_id, t, "paused", ("queued", "running"),
                          "Job was paused; it keeps its last checkpoint")

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume(job_id: str, t: Tenant = Depends(tenant)):
        return transition(job_id, t, "queued", ("paused",), "Job was resumed and is queued")

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100),
               t: Tenant = Depends(tenant)):
        own_job(job_id, t)
        try:
            rows, more = store.list_events(job_id, after, limit)
        except LookupError:
            raise not_found("event", after, param="after") from None
        return _page([_event_public(e) for e in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100),
                    t: Tenant = Depends(tenant)):
        job = own_job(job_id, t)
        try:
            rows, more = store.list_checkpoints(job_id, after, limit)
        except LookupError:
            raise not_found("checkpoint", after, param="after") from None
        return _page([_checkpoint_public(c, job) for c in rows], more)

    # --- models ---------------------------------------------------------------------------------
    def model_cards(t: Tenant) -> list[dict]:
        served = service.engine.base_name if service.engine is not None else None
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "slmtune", "parent": None,
                  "served": name == served} for name in settings.models]
        for job in store.succeeded_models(t.id):
            cards.append({"id": job.fine_tuned_model, "object": "model", "created": int(job.finished_at or 0),
                          "owned_by": t.name, "parent": job.model,
                          "served": job.model == served and job.method != "full"})
        return cards

    @app.get("/v1/models")
    def list_models(t: Tenant = Depends(tenant)):
        return {"object": "list", "data": model_cards(t)}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str, t: Tenant = Depends(tenant)):
        for card in model_cards(t):
            if card["id"] == name:
                return card
        raise ApiError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                       code="model_not_found")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    from slmtune.service import console  # the web console at / and its two JSON helpers

    console.install(app, service, tenant)
    return app
