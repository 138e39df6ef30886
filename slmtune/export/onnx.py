"""Export a run for ONNX Runtime GenAI, and check an export against the PyTorch model.

    slmtune export runs/mine --format onnx --precision int8 --output exports/mine-onnx

The adapter is merged first (slmtune.export.merge, into a temporary folder), then
onnxruntime-genai's model builder turns the merged Hugging Face directory into `model.onnx`,
its weights, `genai_config.json` and the tokenizer files. It runs as a subprocess
(`python -m onnxruntime_genai.models.builder`) with HF_HUB_OFFLINE=1, so it never reaches the hub.

Parity: the exported model and the PyTorch model (the run as `slmtune chat` loads it: base plus
adapter, unmerged) generate greedily from the same fixed prompts. Two numbers, both printed and
written to `parity.json` in the export directory:
- token agreement: the share of generated tokens that match before the first divergence (summed
  over prompts, each side's answer ending at end of turn or after `max_new_tokens`). One flipped
  near-tie changes everything after it, so this compounds with the answer's length.
- next-token agreement: the exported model is fed PyTorch's answer and its greedy choice is
  compared at every position (teacher forcing): how often one step picks the same token, without
  the compounding.
Measured on SmolLM2-135M (12 chat prompts, 64 new tokens; docs/benchmarks.md): fp32 100% / 100%,
int8 53% / 97%, int4 8% / 70%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slmtune.config import RecipeError

PRECISIONS = ("fp32", "int8", "int4")

PARITY_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How do I reset my device?",
    "List three colors.",
]
PARITY_MAX_NEW_TOKENS = 24


class ExportError(RecipeError):
    """The model builder failed or is not installed; the message says what to do."""


@dataclass
class ExportResult:
    path: Path
    parity: dict | None  # what parity.json holds, None when the check was skipped


# --- ONNX Runtime GenAI ----------------------------------------------------------------------
def _og():
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


def onnx_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy generation with the Generator API; the end-of-turn token is included when reached."""
    import numpy as np

    og = _og()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    out: list[int] = []
    while not generator.is_done() and len(out) < max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        out.append(token)
        if token in eos_ids:
            break
    return out


def build_onnx(model_dir: str | Path, out: str | Path, precision: str = "fp32", *, work_dir: str | Path,
               execution_provider: str = "cpu", builder_options: dict[str, str] | None = None) -> Path:
    """Run onnxruntime-genai's model builder on a local Hugging Face directory.

    `builder_options` go to the builder's --extra_options (KEY=VALUE), e.g. {"block_size": "16"}."""
    _og()
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


def onnx_next_token_matches(model, prompt_ids: list[int], reference: list[int]) -> int:
    """Positions where the export's greedy choice, fed the reference answer so far, is the reference token."""
    import numpy as np

    og = _og()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + len(reference) + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    matches = 0
    for i, token in enumerate(reference):
        logits = generator.get_logits()
        matches += int(np.argmax(logits.reshape(-1, logits.shape[-1])[-1]) == token)
        if i + 1 < len(reference):
            generator.append_tokens(np.array([[token]], dtype=np.int32))
    return matches


def torch_next_token_matches(model, prompt_ids: list[int], reference: list[int]) -> int:
    """The same count for a PyTorch model: one forward pass over prompt + reference."""
    import torch

    if not reference:
        return 0
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + reference[:-1]])).logits[0, len(prompt_ids) - 1:]
    return int((logits.argmax(-1) == torch.tensor(reference)).sum())


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A one-turn user prompt ready for the assistant's answer (plain text without a chat template)."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])  # a base model without a chat template continues plain text


# --- parity ----------------------------------------------------------------------------------
def _torch_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=sorted(eos_ids), pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, len(prompt_ids):].tolist()
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def _agreement(reference: list[int], exported: list[int]) -> int:
    n = 0
    for a, b in zip(reference, exported):
        if a != b:
            break
        n += 1
    return n


def parity(run_dir: str | Path, export_dir: str | Path, fmt: str, *, prompts: list[str] | None = None,
           max_new_tokens: int = PARITY_MAX_NEW_TOKENS, reference=None) -> dict:
    """Greedy answers of the export against the PyTorch model; also written to EXPORT_DIR/parity.json.

    `reference` is an already loaded (model, tokenizer) pair; by default the run is loaded as
    `slmtune chat` loads it."""
    from slmtune.chat import load_for_inference
    from slmtune.models import end_of_turn_ids

    export_dir = Path(export_dir)
    prompts = list(prompts or PARITY_PROMPTS)
    model, tokenizer = reference or load_for_inference(str(run_dir))
    eos_ids = end_of_turn_ids(model, tokenizer)
    if fmt == "onnx":
        og = _og()
        exported = og.Model(str(export_dir))
        eos_ids |= genai_eos_ids(export_dir)

        def generate(ids):
            return onnx_greedy(exported, ids, max_new_tokens, eos_ids)

        def next_token_matches(ids, reference):
            return onnx_next_token_matches(exported, ids, reference)
    else:
        from slmtune.models import load_model

        merged = load_model(str(export_dir)).eval()

        def generate(ids):
            return _torch_greedy(merged, tokenizer, ids, max_new_tokens, eos_ids)

        def next_token_matches(ids, reference):
            return torch_next_token_matches(merged, ids, reference)

    rows = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        want = _torch_greedy(model, tokenizer, ids, max_new_tokens, eos_ids)
        got = generate(ids)
        agreed = _agreement(want, got)
        rows.append({
            "prompt": prompt, "agreed_tokens": agreed, "compared_tokens": max(len(want), len(got)),
            "next_token_matches": next_token_matches(ids, want), "reference_tokens": len(want),
            "first_divergence": None if want == got else agreed,
            "pytorch": tokenizer.decode(want, skip_special_tokens=True),
            "exported": tokenizer.decode(got, skip_special_tokens=True),
            "pytorch_tokens": want, "exported_tokens": got,
        })
    agreed = sum(r["agreed_tokens"] for r in rows)
    compared = sum(r["compared_tokens"] for r in rows)
    matches, reference_tokens = sum(r["next_token_matches"] for r in rows), sum(r["reference_tokens"] for r in rows)
    report = {
        "format": fmt,
        "agreed_tokens": agreed,
        "compared_tokens": compared,
        "token_agreement": agreed / compared if compared else 1.0,
        "next_token_agreement": matches / reference_tokens if reference_tokens else 1.0,
        "identical_answers": sum(r["first_divergence"] is None for r in rows),
        "prompts": len(rows),
        "max_new_tokens": max_new_tokens,
        "measure": "token_agreement: greedy tokens matching the PyTorch model's before the first divergence; "
                   "next_token_agreement: the export's greedy choice fed PyTorch's answer (teacher forcing)",
        "examples": rows,
    }
    (export_dir / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_parity(report: dict) -> str:
    return (f"parity ({report['format']} vs PyTorch, greedy): {report['agreed_tokens']}/{report['compared_tokens']} "
            f"tokens agree before the first divergence ({100 * report['token_agreement']:.1f}%), next-token "
            f"agreement {100 * report['next_token_agreement']:.1f}% (fed PyTorch's answer), "
            f"{report['identical_answers']}/{report['prompts']} answers identical")


# --- the export ------------------------------------------------------------------------------
def export_onnx(run_dir: str | Path, out: str | Path, precision: str = "fp32", *, check_parity: bool = True,
                prompts: list[str] | None = None, max_new_tokens: int = PARITY_MAX_NEW_TOKENS,
                builder_options: dict[str, str] | None = None) -> ExportResult:
    """Merge the run's adapter, build the ONNX model into `out` and (by default) check parity.

    Everything is written in a temporary folder beside `out` and renamed at the end."""
    from slmtune.export.merged import merge

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
            report = parity(run_dir, built, "onnx", prompts=prompts, max_new_tokens=max_new_tokens)
        if out.exists():
            out.rmdir()
        os.chmod(built, 0o755)
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out, report)
