"""The service's serving engine, of settings.serve_backend (SLMTUNE_SERVE_BACKEND):

    engine = load_engine(settings, name, model)        # at startup: the first of settings.models
    engine.add_adapter(job.fine_tuned_model, served_adapter(settings, job))   # on first use

- torch (the default): the Hugging Face base (slmtune/serve/engine.py), PEFT adapters straight
  from the jobs' run folders.
- llamacpp: the base converted once to a GGUF file (service/gguf/NAME-QUANT-FINGERPRINT.gguf, from the same
  Hugging Face weights the jobs train on) and decoded by llama.cpp (slmtune/serve/llamacpp_engine.py);
  each job's LoRA converted once to a GGUF LoRA in its job folder (serve/adapter.gguf) on first use.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import uuid
from pathlib import Path

from transformers import AutoConfig

from slmtune.export.gguf import ADAPTER_FILE, GgufExportError, write_gguf, write_gguf_lora
from slmtune.http.errors import ApiError
from slmtune.models import load_model, load_tokenizer, resolve
from slmtune.serve.engine import Engine
from slmtune.service.settings import Settings
from slmtune.training.rundir import RunDir

FINGERPRINT_HEX = 10  # hex digits of weights_fingerprint in a converted base's file name


def load_engine(settings: Settings, name: str, model: str):
    """The serving engine for the base model `name` (a directory or catalog name), of settings.serve_backend."""
    batching = dict(max_batch_size=settings.serve_max_batch_size, continuous_batching=settings.serve_continuous_batching,
                    max_tokens_per_owner=settings.serve_max_tokens_per_tenant)
    if settings.serve_backend == "llamacpp":
        from slmtune.serve.llamacpp_engine import LlamaCppEngine  # llama-cpp-python: the gguf extra, only here

        return LlamaCppEngine.load(str(base_gguf(settings, name, model)), base_name=name,
                                   n_threads=settings.serve_threads, **batching)
    return Engine.load(model, {}, base_name=name, dtype=settings.serve_dtype, **batching)


def _publish(path: Path, write) -> Path:
    """Write `path` through a temporary name unique to this process, then rename: API replicas
    starting together (or two first requests) never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def base_gguf(settings: Settings, name: str, model: str) -> Path:
    """The base model as one GGUF file for llama.cpp, converted from the Hugging Face weights the
    jobs train on (so adapters apply to the weights they learned against), once per source, under
    service/gguf/: the file name carries a fingerprint of the weights, so pointing SLMTUNE_MODELS'
    name at other weights converts them instead of serving the old ones."""
    source = Path(resolve(model))
    stem = settings.service_dir / "gguf" / f"{name}-{settings.serve_gguf_quant}"

    def converted() -> Path:  # the file of the weights as they are now
        return stem.with_name(f"{stem.name}-{weights_fingerprint(source)}.gguf")

    path = converted()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Converting loads the weights in float32: replicas starting together on one volume take turns
    # (one lock per name and quant), and the ones that waited find the file written (flock: released
    # if the holder dies). The fingerprint is taken again under the lock: the weights may have changed.
    with open(stem.with_name(f".{stem.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = converted()
        if not path.is_file():
            _publish(path, lambda tmp: write_gguf(load_model(model), load_tokenizer(model), tmp,
                                                  settings.serve_gguf_quant, name=name))
            # Conversions of earlier weights under this name go: a replica serving one keeps its open
            # (mapped) file; one about to open it fails to load and is retried (service/app.py).
            earlier = re.compile(re.escape(f"{stem.name}-") + rf"[0-9a-f]{{{FINGERPRINT_HEX}}}\.gguf")
            for stale in path.parent.iterdir():
                if stale != path and earlier.fullmatch(stale.name):
                    stale.unlink(missing_ok=True)
    return path


def weights_fingerprint(model_dir: Path) -> str:
    """A short hash of a Hugging Face model folder's path, config and weight files (names, sizes,
    modification times): cheap, and changes whenever the weights are replaced. A hub id (no local
    folder) hashes as its name."""
    files = sorted(f for f in model_dir.iterdir() if f.name == "config.json" or f.suffix in (".safetensors", ".bin")) \
        if model_dir.is_dir() else []
    parts = [str(model_dir.resolve() if model_dir.is_dir() else model_dir)]
    parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:FINGERPRINT_HEX]


def serves_method(settings: Settings, method: str) -> bool:
    """Whether this server answers for a model fine-tuned with `method` (on the base it serves):
    adapters, not full fine-tunes (whole models), and on llama.cpp not DoRA, whose magnitude
    vectors a GGUF LoRA cannot hold (served_adapter says so with a 400)."""
    return method != "full" and not (settings.serve_backend == "llamacpp" and method == "dora")


def served_adapter(settings: Settings, job) -> str:
    """What the engine registers for a fine-tuned model: the run folder (torch), or for llama.cpp the
    run's LoRA as a GGUF LoRA, converted once into the job's folder; ApiError 400 when llama.cpp
    cannot apply this kind of adapter (DoRA, trained modules, PiSSA/OLoRA)."""
    run = RunDir(job.run_dir)
    if settings.serve_backend != "llamacpp":
        return str(run.path)
    path = run.path.parent / "serve" / ADAPTER_FILE
    if not path.is_file():
        base_config = AutoConfig.from_pretrained(resolve(job.base_path))
        try:
            _publish(path, lambda tmp: write_gguf_lora(run.artifact(), base_config, tmp))
        except GgufExportError as err:
            raise ApiError(400, f"`{job.fine_tuned_model}` cannot be served by this server's llama.cpp backend: "
                                f"{err}", param="model", code="model_not_servable") from None
    return str(path)
