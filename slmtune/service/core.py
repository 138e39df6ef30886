"""`Service`: what the routes share: settings, the store, the serving engine, the worker processes.

    service = Service(Settings())                       # create_service_app builds one per app
    service.start_workers(); ...; service.stop_workers()
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

from slmtune.http.errors import ApiError
from slmtune.service.engines import served_adapter, serves_method
from slmtune.service.models import Tenant
from slmtune.service.settings import Settings
from slmtune.service.store import Store


def _term_with_parent() -> None:
    """Embedded workers get SIGTERM (checkpoint, requeue, exit) if the API server dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: heartbeats still protect the job
        pass


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


WORKER_CHECK_SECONDS = 2.0  # how often the service looks for worker processes that exited


class Service:
    """State shared by the routes: settings, store, serving engine, worker processes."""

    def __init__(self, settings: Settings, engine=None):
        self.settings = settings
        self.store = Store(settings.db_url)
        self.engine = engine
        self.engine_error: str | None = None  # why the base failed to load (retried; None once it loads)
        self.workers: list[subprocess.Popen] = []
        self.workers_stopping = threading.Event()

    # --- models -------------------------------------------------------------------------------
    def model_cards(self, tenant: Tenant) -> list[dict]:
        """The base models offered for fine-tuning and the tenant's fine-tuned models."""
        served = self.engine.base_name if self.engine is not None else None
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "slmtune", "parent": None,
                  "served": name == served} for name in self.settings.models]
        for job in self.store.succeeded_models(tenant.id):
            cards.append({"id": job.fine_tuned_model, "object": "model", "created": int(job.finished_at or 0),
                          "owned_by": tenant.name, "parent": job.model,
                          "served": job.model == served and serves_method(self.settings, job.method)})
        return cards

    def ensure_served(self, tenant: Tenant, name: str) -> None:
        """Make `name` answerable by the engine for `tenant` (registering a fine-tuned model's adapter
        on first use), or raise the ApiError that says why it cannot be."""
        engine = self.engine
        if engine is not None and name == engine.base_name:
            return
        job = self.store.job_for_model(name)
        if job is None or job.tenant_id != tenant.id:
            if name in self.settings.models:
                raise ApiError(404, f"The base model `{name}` is offered for fine-tuning but not served here.",
                               param="model", code="model_not_found")
            raise model_not_found(name)
        if engine is None or job.model != engine.base_name:
            raise ApiError(404, f"The model `{name}` is fine-tuned from `{job.model}`, which this server does not "
                                "serve.", param="model", code="model_not_found")
        if job.method == "full":
            raise ApiError(400, f"`{name}` is a full fine-tune (a whole model); this server serves adapters "
                                "(lora, dora, qlora) on its base model. Serve it with `slmtune serve --model`.",
                           param="model", code="model_not_servable")
        if name not in engine.registry:
            try:
                source = served_adapter(self.settings, job)  # (llama.cpp: a 400 for adapters it cannot apply)
                engine.add_adapter(name, source)
            except ApiError:
                raise
            except Exception as err:  # noqa: BLE001 - a damaged run directory, a full disk, registered concurrently
                if name not in engine.registry:
                    raise ApiError(500, f"Cannot load `{name}`: {err}", type="server_error",
                                   code="adapter_load_failed") from None

    # --- workers ------------------------------------------------------------------------------
    def worker_env(self) -> dict[str, str]:
        """The environment of a worker process: this service's settings as SLMTUNE_* variables."""
        env = dict(os.environ)
        for key, value in self.settings.model_dump(mode="json").items():
            if value is not None:
                env[f"SLMTUNE_{key.upper()}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        env["SLMTUNE_DB"] = self.settings.db_url
        return env

    def start_worker(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "slmtune.cli", "worker"], env=self.worker_env(), stdin=subprocess.DEVNULL,
            preexec_fn=_term_with_parent if sys.platform.startswith("linux") else None)

    def start_workers(self) -> None:
        """Start settings.workers worker processes, and a thread that starts a new one for each that
        exits while the service runs (a crash, an out-of-memory kill)."""
        self.workers_stopping.clear()
        self.workers = [self.start_worker() for _ in range(self.settings.workers)]
        if self.workers:
            threading.Thread(target=self._respawn_workers, name="slmtune-worker-respawn", daemon=True).start()

    def _respawn_workers(self) -> None:
        while not self.workers_stopping.wait(WORKER_CHECK_SECONDS):
            for i, p in enumerate(self.workers):
                if p.poll() is not None and not self.workers_stopping.is_set():
                    print(f"worker process {p.pid} exited with {p.returncode}; starting another", file=sys.stderr,
                          flush=True)
                    self.workers[i] = self.start_worker()

    def stop_workers(self, timeout: float = 30) -> None:
        self.workers_stopping.set()
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
