"""Export a run for ONNX Runtime GenAI, and check an export against the PyTorch model.

    slmtune export runs/mine --format onnx --precision int8 --output exports/mine-onnx

The adapter is merged first (slmtune.export.merge, into a temporary folder), then
onnxruntime-genai's model builder turns the merged Hugging Face directory into `model.onnx`,
its weights, `genai_config.json` and the tokenizer files. It runs as a subprocess
(`python -m onnxruntime_genai.models.builder`) with HF_HUB_OFFLINE=1, so it never reaches the hub.

Adapters as files of their own over one shared base (`--format onnx-base` / `onnx-adapter`, onnxruntime-
genai's `.onnx_adapter`): slmtune/export/onnx_adapters.py.

Parity (slmtune/export/parity.py): the export answers the fixed prompts greedily through
`OnnxDecoder`, the same Decoder the ONNX serving backend uses, against the run in PyTorch.
Measured on SmolLM2-135M (12 chat prompts, 64 new tokens; docs/benchmarks.md), token / next-token
agreement: fp32 100% / 100%, int8 53% / 97%, int4 8% / 70%.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from transformers import AutoTokenizer

from slmtune.config import RecipeError
from slmtune.export.merged import merge
from slmtune.export.parity import PARITY_MAX_NEW_TOKENS, parity
from slmtune.generation import Decoding, samples

PRECISIONS = ("fp32", "int8", "int4")


class ExportError(RecipeError):
    """The model builder failed or is not installed; the message says what to do."""


@dataclass
class ExportResult:
    path: Path
    parity: dict | None  # what parity.json holds, None when the check was skipped


# --- ONNX Runtime GenAI ----------------------------------------------------------------------
def onnx_genai():
    try:
        import onnxruntime_genai as og
    except ImportError as err:
        raise ExportError('ONNX export and serving need onnxruntime-genai: pip install -e ".[onnx]"') from err
    return og


def genai_eos_ids(export_dir: str | Path) -> set[int]:
    """The end-of-turn ids recorded in genai_config.json (an int or a list there)."""
    config = json.loads((Path(export_dir) / "genai_config.json").read_text())
    eos = config.get("model", {}).get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}


def build_onnx(model_dir: str | Path, out: str | Path, precision: str = "fp32", *, work_dir: str | Path,
               execution_provider: str = "cpu", builder_options: dict[str, str] | None = None) -> Path:
    """Run onnxruntime-genai's model builder on a local Hugging Face directory.

    `builder_options` go to the builder's --extra_options (KEY=VALUE), e.g. {"block_size": "16"}."""
    onnx_genai()
    try:
        import onnx_ir  # noqa: F401  the builder imports it; say so before it fails halfway
    except ImportError as err:
        raise ExportError('the ONNX model builder needs onnx_ir: pip install -e ".[onnx]"') from err
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    work_dir = Path(work_dir)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(model_dir).resolve()),
           "-o", str(Path(out).resolve()), "-p", precision, "-e", execution_provider,
           "-c", str((work_dir / "builder-cache").resolve())]
    if builder_options:
        cmd += ["--extra_options", *(f"{key}={value}" for key, value in builder_options.items())]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work_dir)
    if proc.returncode != 0 or not (Path(out) / "genai_config.json").is_file():
        log = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        raise ExportError(f"the ONNX model builder failed (exit {proc.returncode}):\n{log}")
    return Path(out)


def onnx_next_token_matches(model, prompt_ids: list[int], reference: list[int], adapters=None,
                            adapter: str | None = None) -> int:
    """Positions where the export's greedy choice, fed the reference answer so far, is the reference token
    (with `adapter`, loaded in onnxruntime-genai's `adapters` under that name, active)."""
    og = onnx_genai()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + len(reference) + 1, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    matches = 0
    for i, token in enumerate(reference):
        logits = generator.get_logits()
        matches += int(np.argmax(logits.reshape(-1, logits.shape[-1])[-1]) == token)
        if i + 1 < len(reference):
            generator.append_tokens(np.array([[token]], dtype=np.int32))
    return matches


# The serving engine's name for the base model's rows in a batch mixing adapters (slmtune/serve/engine.py).
BASE_ROW = "__base__"


class OnnxDecoder:
    """The Decoder protocol (slmtune/generation.py) on onnxruntime-genai, for serving and parity: each
    row gets its own Generator with its own search options (greedy, or sampled with its temperature,
    top_p and seed); the generators advance one token each in turn, so a batch's rows stream together.

    LoRA adapters (a base from `--format onnx-base`): `adapters` is the model's og.Adapters; a row runs
    with the adapter its Decoding names (`row.adapter`, a name loaded in `adapters`; BASE_ROW: none),
    else with `adapter` (None: the base model). The adapter is set on the row's own Generator, so rows
    of different adapters share a batch."""

    def __init__(self, model, vocab_size: int, adapters=None, adapter: str | None = None):
        self.model = model
        self.vocab_size = vocab_size
        self.adapters = adapters
        self.adapter = adapter

    def decode(self, rows: list[Decoding], join: Callable[[], list[Decoding]] | None = None) -> None:
        active = [(row, self._generator(row)) for row in rows]
        while active:
            still = []
            for row, generator in active:
                if row.completion.cancelled:
                    row.add(-1)  # finishes the row as stopped
                else:
                    try:
                        generator.generate_next_token()
                        row.add(int(generator.get_next_tokens()[0]))
                    except Exception as err:  # noqa: BLE001 - this row fails alone, the others go on
                        row.fail(err)
                    if generator.is_done() and not row.finished:
                        row.finish("length")
                if not row.finished:
                    still.append((row, generator))
            # Rows joining between steps get generators of their own (each row has one anyway).
            for row in join() if join is not None else []:
                try:
                    still.append((row, self._generator(row)))
                except Exception as err:  # noqa: BLE001 - the rows already running go on
                    row.fail(err)
            active = still

    def _generator(self, row: Decoding):
        og = onnx_genai()
        c = row.completion
        p = c.params
        params = og.GeneratorParams(self.model)
        options = dict(max_length=c.prompt_tokens + c.max_tokens, do_sample=samples(p))
        if samples(p):
            options |= dict(temperature=p.temperature, top_p=p.top_p, top_k=self.vocab_size,
                            random_seed=p.seed % 2**31 if p.seed is not None else secrets.randbits(31))
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        adapter = row.adapter if row.adapter is not None else self.adapter
        if adapter is not None and adapter != BASE_ROW:
            generator.set_active_adapter(self.adapters, adapter)  # before the prompt runs
        generator.append_tokens(np.array([c.prompt_ids], dtype=np.int32))
        return generator


def genai_vocab_size(export_dir: str | Path, tokenizer) -> int:
    config = json.loads((Path(export_dir) / "genai_config.json").read_text()).get("model", {})
    return int(config.get("vocab_size") or len(tokenizer))


def export_tokenizer(export_dir: str | Path):
    """The tokenizer the builder copied into the export (the folder has no config.json, so it is
    not a model directory for slmtune.models)."""
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class OnnxCandidate:
    """An ONNX export as a parity candidate (slmtune/export/parity.py); with `adapter_file`, a base
    export (`--format onnx-base`) with that `.onnx_adapter` active."""

    def __init__(self, export_dir: str | Path, tokenizer=None, adapter_file: str | Path | None = None):
        og = onnx_genai()
        self.model = og.Model(str(export_dir))
        vocab = genai_vocab_size(export_dir, tokenizer or export_tokenizer(export_dir))
        self.adapters, self.adapter = None, None
        if adapter_file is not None:
            self.adapters, self.adapter = og.Adapters(self.model), "candidate"
            self.adapters.load(str(adapter_file), self.adapter)
        self.decoder = OnnxDecoder(self.model, vocab, self.adapters, self.adapter)
        self.extra_eos_ids = genai_eos_ids(export_dir)

    def next_token_matches(self, prompt_ids: list[int], reference: list[int]) -> int:
        return onnx_next_token_matches(self.model, prompt_ids, reference, self.adapters, self.adapter)


# --- the export ------------------------------------------------------------------------------
def export_onnx(run_dir: str | Path, out: str | Path, precision: str = "fp32", *, check_parity: bool = True,
                prompts: list[str] | None = None, max_new_tokens: int = PARITY_MAX_NEW_TOKENS,
                builder_options: dict[str, str] | None = None) -> ExportResult:
    """Merge the run's adapter, build the ONNX model into `out` and (by default) check parity.

    Everything is written in a temporary folder beside `out` and renamed at the end."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out}: exists and is not empty")
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged = merge(run_dir, work / "merged")
        built = build_onnx(merged, work / "onnx", precision, work_dir=work, builder_options=builder_options)
        report = None
        if check_parity:
            candidate = OnnxCandidate(built)
            report = parity(run_dir, built, candidate, "onnx", prompts=prompts, max_new_tokens=max_new_tokens)
        publish(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out, report)


def publish(built: Path, out: Path) -> None:
    """Move a finished build folder to `out` (an empty `out` is replaced), readable by others."""
    if out.exists():
        out.rmdir()
    os.chmod(built, 0o755)
    os.replace(built, out)
