"""The llama.cpp backend: serve a GGUF file (`slmtune export --format gguf`) through the same API.

    engine = LlamaCppEngine.load("exports/mine-gguf/model.gguf").start()   # `slmtune serve --backend llamacpp`
    app = create_app(engine)

It is the serving Engine (queue, batch collection, stop conditions, streaming callbacks, cancels,
stats) with a LlamaCppDecoder (slmtune/export/gguf.py): llama.cpp's weights and kernels through
llama-cpp-python (`pip install -e ".[gguf]"`). The tokenizer and chat template are the ones the GGUF
carries, read by transformers' GGUF loader, so prompts are the same ids as PyTorch's.

Adapters by name: GGUF LoRA files (`slmtune export RUN --format gguf-lora`) registered with
`--adapter NAME=DIR_OR_FILE` or the admin API load onto the one llama.cpp model on first use
(GgufAdapters); a request naming one is decoded with it, the base model's name with none.

Limits, said plainly: one llama.cpp context decodes the rows of a batch one after another (no
multi-sequence batching yet), so this backend suits one or a few clients.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path

import gguf
from transformers import AutoTokenizer

from slmtune.export.gguf import (ADAPTER_FILE, GGUF_FILE, GgufExportError, LlamaCppCandidate, context_length_of,
                                 llama_cpp)
from slmtune.serve.adapters import AdapterError, AdapterNames, AdapterSource, check_adapter_name
from slmtune.serve.engine import Engine

MAX_CONTEXT = 8192


def gguf_file(target: str | os.PathLike) -> Path:
    """A .gguf file, or an export folder holding model.gguf."""
    path = Path(target).expanduser()
    if path.is_dir():
        path = path / GGUF_FILE
    if not path.is_file() or path.suffix != ".gguf":
        raise GgufExportError(f"{target}: not a GGUF file (nor a folder with {GGUF_FILE}); make one with "
                              "`slmtune export RUN_DIR --format gguf --output DIR`")
    return path


class GgufAdapters(AdapterNames):
    """The llama.cpp backend's adapter registry (AdapterNames' allow-list and LRU set):
    names -> GGUF LoRA files, loaded onto the one llama.cpp model on first use, at most `max_loaded`
    at once (the least recently used is freed). The engine decodes one row at a time, so `use(name)`
    sets that adapter (or none, for the base) on the context before its batch."""

    def __init__(self, llm, *, max_loaded: int = 4):
        super().__init__(llm, max_loaded=max_loaded)
        self.architecture = str(llm.metadata.get("general.architecture", ""))
        self._low = llama_cpp().llama_cpp

    def _resolve(self, name: str, path: str | os.PathLike) -> AdapterSource:
        check_adapter_name(name)
        return AdapterSource(name, lora_file(path, self.architecture), str(path))

    @contextmanager
    def use_mixed(self, names: list[str | None]):
        yield None  # rows are decoded one at a time: each adapter gets its own batch

    @contextmanager
    def use(self, name: str | None):
        adapter = None if name is None else self._ensure_loaded(name)
        self._activate(adapter)
        yield self.model

    def _activate(self, adapter) -> None:
        """Make `adapter` (None: no adapter) the only one applied on the context."""
        n = 0 if adapter is None else 1
        adapters = (self._low.llama_adapter_lora_p_ctypes * max(n, 1))(*([adapter] if n else []))
        scales = (ctypes.c_float * max(n, 1))(*([1.0] if n else []))
        if self._low.llama_set_adapters_lora(self.model.ctx, adapters, n, scales):
            raise AdapterError("llama.cpp could not apply the adapter to its context")

    def _open(self, source: AdapterSource):
        adapter = self._low.llama_adapter_lora_init(self.model.model, str(source.path).encode())
        if not adapter:
            raise AdapterError(f"adapter {source.name!r} ({source.path}) could not be loaded by llama.cpp")
        return adapter

    def _close(self, name: str, adapter) -> None:
        self._activate(None)  # never free an adapter the context still applies
        self._low.llama_adapter_lora_free(adapter)


def lora_file(path: str | os.PathLike, architecture: str) -> Path:
    """A GGUF LoRA (`--format gguf-lora`'s adapter.gguf, or its export folder) for a base of
    `architecture`; AdapterError naming what is wrong otherwise."""
    given = Path(path).expanduser()
    file = given / ADAPTER_FILE if given.is_dir() else given
    if not file.is_file():
        raise AdapterError(f"{given}: no GGUF LoRA there (the llama.cpp backend serves adapters exported with "
                           "`slmtune export RUN_DIR --format gguf-lora --output DIR`)")
    try:
        fields = gguf.GGUFReader(str(file)).fields
        kind = fields["general.type"].contents() if "general.type" in fields else None
        lora = fields["adapter.type"].contents() if "adapter.type" in fields else None
        arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    except (ValueError, OSError, KeyError) as err:
        raise AdapterError(f"{file}: not a readable GGUF file ({err})") from None
    if kind != "adapter" or lora != "lora":
        raise AdapterError(f"{file}: a GGUF {kind or 'model'}, not a LoRA adapter (export one with --format gguf-lora)")
    if architecture and arch != architecture:
        raise AdapterError(f"{file}: a LoRA for {arch}, but the served model is {architecture}")
    return file.resolve()


class LlamaCppEngine(Engine):
    """The serving Engine over one GGUF file, decoding with llama.cpp; adapters by name (GGUF LoRAs)."""

    @classmethod
    def load(cls, target: str, adapters: dict[str, str] | None = None, *, base_name: str | None = None,
             max_loaded_adapters: int = 4, n_threads: int | None = None, **kwargs) -> "LlamaCppEngine":
        path = gguf_file(target)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # The KV cache is allocated for the whole context up front: cap it (128k-context models would
        # take gigabytes); longer requests get the engine's context_length_exceeded 400.
        context_length = min(context_length_of(path) or 2048, MAX_CONTEXT)
        candidate = LlamaCppCandidate(path, n_ctx=context_length, n_threads=n_threads)
        eos_ids = set(candidate.extra_eos_ids)
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        name = base_name or (path.parent.name if path.name == GGUF_FILE else path.stem)
        registry = GgufAdapters(candidate.llm, max_loaded=max_loaded_adapters)
        for adapter_name, adapter_path in (adapters or {}).items():
            registry.register(adapter_name, adapter_path, reserved={name})
        return cls(tokenizer, registry, base_name=name, eos_ids=eos_ids, context_length=context_length,
                   new_decoder=lambda model, mixed: candidate.decoder, **kwargs)
