"""The ONNX backend: serve a model exported by `slmtune export --format onnx` through the same API.

    engine = OnnxEngine.load("exports/mine-onnx").start()     # what `slmtune serve --backend onnx` does
    engine = OnnxEngine.load("exports/base-onnx", adapters={"a": "exports/a-onnx"}).start()
    app = create_app(engine)

It is the serving Engine (queue, batch collection, stop conditions, streaming callbacks, stats)
with an OnnxDecoder: generation by onnxruntime-genai's Generator API from the export's genai_config.json.

A merged export (`--format onnx`) has its adapter in its weights: /v1/models lists just the model,
and registering an adapter is refused. A LoRA base (`--format onnx-base`) serves adapters by name:
`.onnx_adapter` files (`--format onnx-adapter`) registered with `--adapter NAME=DIR_OR_FILE` or the
admin API (OnnxAdapters: AdapterNames' allow-list, checked against the base's LoRA inputs at
registration) are loaded into onnxruntime-genai's og.Adapters on first use, at most
`max_loaded_adapters` at once (least recently used unloaded). A request naming an adapter is decoded
with it, the base model's name with none. Each row has a Generator of its own with its adapter set
on it, so one batch mixes the base and any adapters loaded (up to `max_loaded_adapters` different
ones; beyond that each adapter gets a batch of its own, as with the PyTorch backend).
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from slmtune.export.onnx import ExportError, OnnxDecoder, export_tokenizer, genai_eos_ids, genai_vocab_size, onnx_genai
from slmtune.export.onnx_adapters import onnx_adapter_file, read_base_info
from slmtune.serve.adapters import AdapterError, AdapterNames, AdapterSource, NoAdapters, check_adapter_name
from slmtune.serve.engine import Engine, default_base_name

log = logging.getLogger("slmtune.serve")


class ActiveAdapter(NamedTuple):
    """What OnnxAdapters.use(name) yields: the model and onnxruntime-genai's name of the adapter that
    rows of the batch run with (None: the base model)."""

    model: object
    adapter: str | None


class OnnxAdapters(AdapterNames):
    """The ONNX backend's adapter registry over a LoRA base export: names -> `.onnx_adapter` files,
    loaded into one og.Adapters on first use (under names of our own, slot0, slot1...), at most
    `max_loaded` at once. Loading and unloading happen on the engine thread between batches, when no
    Generator holds an adapter (onnxruntime-genai refuses to unload one in use)."""

    def __init__(self, model, base_info: dict, *, max_loaded: int = 4):
        super().__init__(model, max_loaded=max_loaded)
        self.base_info = base_info
        self.genai = onnx_genai().Adapters(model)
        self._slots = (f"slot{i}" for i in itertools.count())
        # (name, slot) evicted while a Generator still held them: unloaded once it is gone (a failed
        # row's stored exception can keep its Generator alive through a traceback cycle until the
        # garbage collector runs), so that memory does not grow past max_loaded.
        self.pending_unloads: list[tuple[str, str]] = []

    def _resolve(self, name: str, path) -> AdapterSource:
        check_adapter_name(name)
        try:
            file = onnx_adapter_file(path, self.base_info)
        except ExportError as err:
            raise AdapterError(str(err)) from None
        return AdapterSource(name, file, str(path))

    @contextmanager
    def use(self, name: str | None):
        yield ActiveAdapter(self.model, None if name is None else self._ensure_loaded(name))

    @contextmanager
    def use_mixed(self, names: list[str | None]):
        """(model, each row's adapter: its onnxruntime-genai name, "__base__" for the base model), or
        None when more adapters are asked for than may be loaded at once."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        if not wanted or len(wanted) > self.max_loaded:
            yield None
            return
        self._touch(wanted)
        slots = {name: self._ensure_loaded(name) for name in wanted}
        yield self.model, ["__base__" if n is None else slots[n] for n in names]

    def _open(self, source: AdapterSource) -> str:
        self.retry_unloads()
        slot = next(self._slots)
        try:
            self.genai.load(str(source.path), slot)
        except Exception as err:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError with its reason
            raise AdapterError(f"adapter {source.name!r} ({source.given}) could not be loaded: {err}") from err
        return slot

    def _close(self, name: str, slot: str) -> None:
        try:
            self.genai.unload(slot)
        except Exception:  # noqa: BLE001 - held by a Generator, maybe only through a reference cycle
            self.pending_unloads.append((name, slot))
            self.retry_unloads()  # at once: the garbage collector may free it; else before the next load
            if (name, slot) in self.pending_unloads:
                log.warning("onnxruntime-genai could not unload adapter %s (%s) yet", name, slot)

    def retry_unloads(self) -> None:
        """Unload the evicted adapters that are still loaded (before each load, so that loaded ones
        stay about max_loaded); those a live Generator holds stay pending."""
        if not self.pending_unloads:
            return
        gc.collect()  # drops Generators only reference cycles keep alive
        still = []
        for name, slot in self.pending_unloads:
            try:
                self.genai.unload(slot)
            except Exception:  # noqa: BLE001 - still held by a live Generator: tried again before the next load
                still.append((name, slot))
        self.pending_unloads = still


class OnnxEngine(Engine):
    """The serving Engine over an ONNX Runtime GenAI model directory (genai_config.json, model.onnx,
    tokenizer), decoding with OnnxDecoder; adapters by name over a LoRA base export."""

    @classmethod
    def load(cls, export_dir: str, adapters: dict[str, str] | None = None, *, base_name: str | None = None,
             max_loaded_adapters: int = 4, **kwargs) -> "OnnxEngine":
        path = Path(export_dir).expanduser()
        if not (path / "genai_config.json").is_file():
            raise ExportError(f"{export_dir}: not an ONNX export (no genai_config.json); "
                              "make one with `slmtune export RUN_DIR --format onnx --output DIR`")
        base_info = read_base_info(path)
        if adapters and base_info is None:
            raise AdapterError(f"{export_dir} has its adapter merged (--format onnx): --backend onnx over a merged "
                               "export takes no --adapter; to serve adapters by name, export a base with "
                               "--format onnx-base and each run with --format onnx-adapter")
        og = onnx_genai()
        model_config = json.loads((path / "genai_config.json").read_text()).get("model", {})
        tokenizer = export_tokenizer(path)
        model = og.Model(str(path))
        eos_ids = genai_eos_ids(path)
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        vocab_size = genai_vocab_size(path, tokenizer)
        name = base_name or default_base_name(str(path))
        if base_info is None:
            registry = NoAdapters(model, "the ONNX backend serves this export with its adapter merged; it cannot load "
                                         "adapters (export a base with --format onnx-base to serve adapters by name)")
            genai_adapters = None
        else:
            registry = OnnxAdapters(model, base_info, max_loaded=max_loaded_adapters)
            for adapter_name, adapter_path in (adapters or {}).items():
                registry.register(adapter_name, adapter_path, reserved={name})
            genai_adapters = registry.genai
        return cls(tokenizer, registry, base_name=name, eos_ids=eos_ids,
                   context_length=int(model_config.get("context_length") or 2048),
                   new_decoder=lambda m, mixed: OnnxDecoder(model, vocab_size, genai_adapters,
                                                            m.adapter if isinstance(m, ActiveAdapter) else None),
                   **kwargs)
