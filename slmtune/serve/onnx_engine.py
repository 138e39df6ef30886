"""The ONNX backend: serve a model exported by `slmtune export --format onnx` through the same API.

    engine = OnnxEngine.load("exports/mine-onnx").start()     # what `slmtune serve --backend onnx` does
    app = create_app(engine)

It is the PyTorch Engine (queue, batch collection, stop conditions, streaming callbacks, stats)
with generation done by onnxruntime-genai's Generator API from the export's genai_config.json.
Each request of a batch gets its own Generator with its own search options (greedy, or sampled
with its temperature, top_p and seed); the generators advance one token each in turn, so a batch's
requests stream together. The export has its adapter merged in, so there are no adapters to serve:
/v1/models lists just the model, and registering one is refused.
"""

from __future__ import annotations

import json
import secrets
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from slmtune.serve.adapters import AdapterError, UnknownModel
from slmtune.serve.engine import Engine, _Row, default_base_name


class NoAdapters:
    """The registry an ONNX engine has: the model itself and nothing else."""

    max_loaded = 0
    loads = 0
    evictions = 0

    def __init__(self, model):
        self.model = model

    def register(self, name, path, *, reserved=frozenset()):
        raise AdapterError("the ONNX backend serves one exported model with its adapter merged; "
                           "it cannot load adapters (serve them with the PyTorch backend)")

    def remove(self, name):
        raise UnknownModel(name)

    def __contains__(self, name) -> bool:
        return False

    def names(self) -> list[str]:
        return []

    def loaded(self) -> list[str]:
        return []

    def describe(self) -> list[dict]:
        return []

    def sync(self) -> None:
        pass

    @contextmanager
    def use(self, name):
        if name is not None:
            raise UnknownModel(name)
        yield self.model


class OnnxEngine(Engine):
    """Engine over an ONNX Runtime GenAI model directory (genai_config.json, model.onnx, tokenizer)."""

    def __init__(self, model, tokenizer, config: dict, *, base_name: str, **kwargs):
        model_config = config.get("model", {})
        eos = model_config.get("eos_token_id")
        eos = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        # Engine reads the end-of-turn ids and the context window from a transformers-like config.
        shim = SimpleNamespace(generation_config=None, config=SimpleNamespace(
            eos_token_id=eos, max_position_embeddings=model_config.get("context_length")))
        super().__init__(shim, tokenizer, NoAdapters(model), base_name=base_name, **kwargs)
        self.onnx_model = model
        self.vocab_size = int(model_config.get("vocab_size") or len(tokenizer))

    @classmethod
    def load(cls, export_dir: str, adapters: dict[str, str] | None = None, *, base_name: str | None = None,
             max_loaded_adapters: int = 0, **kwargs) -> "OnnxEngine":
        from transformers import AutoTokenizer

        from slmtune.export.onnx import ExportError, _og

        if adapters:
            raise AdapterError("the ONNX backend cannot serve adapters: export each run with its adapter merged")
        path = Path(export_dir).expanduser()
        if not (path / "genai_config.json").is_file():
            raise ExportError(f"{export_dir}: not an ONNX export (no genai_config.json); "
                              "make one with `slmtune export RUN_DIR --format onnx --output DIR`")
        og = _og()
        config = json.loads((path / "genai_config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = og.Model(str(path))
        return cls(model, tokenizer, config, base_name=base_name or default_base_name(str(path)), **kwargs)

    def _generate(self, model, rows: list[_Row]) -> None:
        import numpy as np

        import onnxruntime_genai as og

        active = []
        for row in rows:
            req = row.request
            p = req.params
            params = og.GeneratorParams(model)
            options = dict(max_length=req.prompt_tokens + req.max_tokens, do_sample=p.temperature > 0)
            if p.temperature > 0:
                options |= dict(temperature=p.temperature, top_p=p.top_p, top_k=self.vocab_size,
                                random_seed=p.seed % 2**31 if p.seed is not None else secrets.randbits(31))
            params.set_search_options(**options)
            generator = og.Generator(model, params)
            generator.append_tokens(np.array([req.prompt_ids], dtype=np.int32))
            active.append((row, generator))
        while active:
            still = []
            for row, generator in active:
                if row.request.cancelled:
                    row.add(-1)  # finishes the row as stopped
                else:
                    generator.generate_next_token()
                    row.add(int(generator.get_next_tokens()[0]))
                    if generator.is_done() and not row.finished:
                        row._finish("length", row.decode(row.tokens))
                if not row.finished:
                    still.append((row, generator))
            active = still
