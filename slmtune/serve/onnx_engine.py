"""The ONNX backend: serve a model exported by `slmtune export --format onnx` through the same API.

    engine = OnnxEngine.load("exports/mine-onnx").start()     # what `slmtune serve --backend onnx` does
    app = create_app(engine)

It is the serving Engine (queue, batch collection, stop conditions, streaming callbacks, stats)
with an OnnxDecoder: generation by onnxruntime-genai's Generator API from the export's genai_config.json. The export has its adapter merged in, so there are no adapters to serve:
/v1/models lists just the model, and registering one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from slmtune.export.onnx import ExportError, OnnxDecoder, export_tokenizer, genai_eos_ids, genai_vocab_size, onnx_genai
from slmtune.serve.adapters import AdapterError, NoAdapters
from slmtune.serve.engine import Engine, default_base_name


class OnnxEngine(Engine):
    """The serving Engine over an ONNX Runtime GenAI model directory (genai_config.json, model.onnx,
    tokenizer), decoding with OnnxDecoder."""

    @classmethod
    def load(cls, export_dir: str, adapters: dict[str, str] | None = None, *, base_name: str | None = None,
             max_loaded_adapters: int = 0, **kwargs) -> "OnnxEngine":
        if adapters:
            raise AdapterError("the ONNX backend cannot serve adapters: export each run with its adapter merged")
        path = Path(export_dir).expanduser()
        if not (path / "genai_config.json").is_file():
            raise ExportError(f"{export_dir}: not an ONNX export (no genai_config.json); "
                              "make one with `slmtune export RUN_DIR --format onnx --output DIR`")
        og = onnx_genai()
        model_config = json.loads((path / "genai_config.json").read_text()).get("model", {})
        tokenizer = export_tokenizer(path)
        model = og.Model(str(path))
        eos_ids = genai_eos_ids(path)
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        vocab_size = genai_vocab_size(path, tokenizer)
        return cls(tokenizer, NoAdapters(model, "the ONNX backend serves one exported model with its adapter merged; it cannot "
                                                  "load adapters (serve them with the PyTorch backend)"), base_name=base_name or default_base_name(str(path)),
                   eos_ids=eos_ids, context_length=int(model_config.get("context_length") or 2048),
                   new_decoder=lambda m, mixed: OnnxDecoder(m, vocab_size), **kwargs)
