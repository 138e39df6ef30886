"""The llama.cpp backend: serve a GGUF file (`slmtune export --format gguf`) through the same API.

    engine = LlamaCppEngine.load("exports/mine-gguf/model.gguf").start()   # `slmtune serve --backend llamacpp`
    app = create_app(engine)

It is the serving Engine (queue, batch collection, stop conditions, streaming callbacks, cancels,
stats) with a LlamaCppDecoder (slmtune/export/gguf.py): llama.cpp's weights and kernels through
llama-cpp-python (`pip install -e ".[gguf]"`). The tokenizer and chat template are the ones the GGUF
carries, read by transformers' GGUF loader, so prompts are the same ids as PyTorch's.

Limits, said plainly: one llama.cpp context decodes the rows of a batch one after another (no
multi-sequence batching yet), so this backend suits one or a few clients; and it serves the one
model in the file (export with the adapter merged; registering adapters is refused).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer

from slmtune.export.gguf import GGUF_FILE, GgufExportError, LlamaCppCandidate, context_length_of
from slmtune.serve.adapters import AdapterError, NoAdapters
from slmtune.serve.engine import Engine

MAX_CONTEXT = 8192
NO_ADAPTERS = ("the llama.cpp backend serves one GGUF file with its adapter merged; it cannot load adapters "
               "(serve them with the PyTorch backend, or export each run with --format gguf)")


def gguf_file(target: str | os.PathLike) -> Path:
    """A .gguf file, or an export folder holding model.gguf."""
    path = Path(target).expanduser()
    if path.is_dir():
        path = path / GGUF_FILE
    if not path.is_file() or path.suffix != ".gguf":
        raise GgufExportError(f"{target}: not a GGUF file (nor a folder with {GGUF_FILE}); make one with "
                              "`slmtune export RUN_DIR --format gguf --output DIR`")
    return path


class LlamaCppEngine(Engine):
    """The serving Engine over one GGUF file, decoding with llama.cpp."""

    @classmethod
    def load(cls, target: str, adapters: dict[str, str] | None = None, *, base_name: str | None = None,
             max_loaded_adapters: int = 0, n_threads: int | None = None, **kwargs) -> "LlamaCppEngine":
        if adapters:
            raise AdapterError(NO_ADAPTERS)
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
        return cls(tokenizer, NoAdapters(candidate.llm, NO_ADAPTERS), base_name=name, eos_ids=eos_ids,
                   context_length=context_length, new_decoder=lambda model, names: candidate.decoder, **kwargs)
