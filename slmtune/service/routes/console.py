"""The web console (static HTML + CSS + vanilla JavaScript in static/) and the two small JSON
endpoints its new-job wizard uses. The page holds no data itself: its script calls /v1 with the
API key the user signs in with (kept in the browser's sessionStorage), like the openai client.

    GET /                                         the console (index.html); /static/... its assets
    GET /v1/slmtune/methods                       the methods the service offers
    GET /v1/slmtune/auto_hyperparameters          ?training_file=ID[&model=BASE]: what "auto" picks for that
                                                  file (with the model: counting its answers' tokens, as a job does)
    GET /v1/slmtune/plan                          ?model=BASE&method=lora[&batch_size=N][&seq_len=N]:
                                                  slmtune.training.plan's memory estimate on this server's
                                                  hardware (GPU memory, else RAM as cpu:NGB)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from slmtune.http.errors import ApiError
from slmtune.methods import METHODS, SERVICE_METHODS
from slmtune.service import hyper
from slmtune.service.core import Service
from slmtune.service.deps import current_tenant, get_service
from slmtune.service.jobs import METHOD_FORMATS, count_target_tokens
from slmtune.service.models import Tenant
from slmtune.training import plan as planner

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter()
DEFAULT_SEQ_LEN = 1024  # data.max_length's default, which jobs train with


def server_hardware() -> str:
    """slmtune.training.plan's hardware string for this machine: NxGB of the visible GPUs, else cpu:RAM."""
    try:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            gb = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 1024**3
            return f"{n}x{gb:.1f}GB"
    except Exception:  # noqa: BLE001
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 1024**3
    return f"cpu:{ram / 1024**3:.1f}GB"


def mount_static(app: FastAPI) -> None:
    """The console's assets under /static (a mount: it must come before the serving engine's catch-all)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="console-static")


@router.get("/", include_in_schema=False)
def console_index():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})


@router.get("/v1/slmtune/methods")
def methods():
    """The methods the service trains with, for the wizard (the one list: slmtune.methods.SERVICE_METHODS)."""
    return {"object": "list", "data": [{"id": name, "summary": METHODS[name].summary,
                                        "base_learning_rate": METHODS[name].auto_learning_rate}
                                       for name in SERVICE_METHODS]}


@router.get("/v1/slmtune/auto_hyperparameters")
def auto_hyperparameters(training_file: str, model: str | None = None, validation_file: str | None = None,
                         t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    """What "auto" resolves to for a job on `training_file` (with `model`: counting the answers'
    tokens as the job will; with `validation_file`: nothing held out, as the job will)."""
    f = service.store.get_file(t.id, training_file)
    if f is None:
        raise ApiError(404, f"No file with id `{training_file}` exists.", param="training_file",
                       code="file_not_found")
    if validation_file is not None and service.store.get_file(t.id, validation_file) is None:
        raise ApiError(404, f"No file with id `{validation_file}` exists.", param="validation_file",
                       code="file_not_found")
    if model is not None and model not in service.settings.models:
        raise ApiError(400, f"Model `{model}` is not available for fine-tuning.", param="model",
                       code="model_not_available")
    validation_given = validation_file is not None
    # A file of preference pairs trains with DPO, prompts with reinforcement, any other with supervised.
    method_type = next((t for t, fmt in METHOD_FORMATS.items() if fmt == f.format), "supervised")
    # Supervised epochs also count the answers' tokens, which takes the model's tokenizer: with a
    # model, the values a job would get; without, the examples term alone.
    target_tokens = None
    if model is not None and method_type == "supervised":
        target_tokens = count_target_tokens(service.settings, model, f, validation_file=validation_given)
    auto = hyper.auto_values(f.n_examples, method_type, target_tokens, validation_file=validation_given)
    return {"object": "slmtune.auto_hyperparameters", "training_file": f.id, "validation_file": validation_file,
            "n_examples": f.n_examples, "target_tokens": target_tokens,
            "target_tokens_text": (hyper.tokens_text(target_tokens, f.n_examples, validation_file=validation_given)
                                   if target_tokens is not None else None),
            "model": model, "format": f.format, "method_type": method_type,
            "auto": auto, "steps_per_epoch": hyper.steps_of(auto | {"n_epochs": 1}, f.n_examples,
                                                          validation_file=validation_given),
            "base_learning_rate": hyper.BASE_LEARNING_RATE}


@router.get("/v1/slmtune/plan")
def plan(model: str, method: Literal[SERVICE_METHODS] = "lora",  # type: ignore[valid-type]
         batch_size: int = Query(1, ge=1, le=256), seq_len: int = Query(DEFAULT_SEQ_LEN, ge=16, le=131072),
         t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    settings = service.settings
    if model not in settings.models:
        raise ApiError(400, f"Model `{model}` is not available for fine-tuning (offered: "
                            f"{', '.join(settings.models) or 'none'}).", param="model", code="model_not_available")
    hardware = server_hardware()
    try:
        arch = planner.architecture(settings.models[model])
    except (ValueError, OSError, KeyError) as err:
        raise ApiError(400, f"No memory estimate for `{model}`: {err}", param="model",
                       code="plan_unavailable") from None
    hw = planner.Hardware.parse(hardware)
    budget = hw.memory_gb * planner.GB

    def row(m: str) -> dict:
        e = planner.estimate(arch, m, seq_len=seq_len, micro_batch=batch_size, cpu=hw.cpu,
                             bf16=planner.computes_in_bf16(hw))
        return {"method": m, "trainable_params": e.trainable, "weights": e.weights, "gradients": e.gradients,
                "optimizer": e.optimizer, "activations": e.activations, "overhead": e.overhead,
                "total": e.total, "fits": e.total <= budget}

    rows = [row(m) for m in SERVICE_METHODS]
    chosen = next(r for r in rows if r["method"] == method)
    return {"object": "slmtune.plan", "model": model, "method": method, "hardware": str(hw),
            "budget_bytes": budget, "seq_len": seq_len, "micro_batch": batch_size,
            "total_params": arch.total_params(), "estimate": chosen, "fits": chosen["fits"], "methods": rows}
