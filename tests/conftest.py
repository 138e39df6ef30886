"""Shared fixtures: tiny random Llama and Phi-3 models with a tiny ChatML tokenizer, built in-process.

They are saved as ordinary local Hugging Face directories, so the whole pipeline (resolve, load,
tokenize, train, save, chat) runs on them offline in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# What `slmtune train` uses when train.num_threads is unset: torch's default, the physical cores.
MACHINE_THREADS = torch.get_num_threads()
# Unit tests run one thread each: tiny models gain nothing from more, and results stay comparable.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The Lumo 3 lamp resets when you hold the power button for 12 seconds.",
    "What is the capital of France? Paris is the capital of France.",
    "user assistant system hello world, how are you today? I am fine, thanks.",
    "Batteries last 41 hours; charging takes 95 minutes over USB-C.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML
    return fast


def build_model(arch: str, vocab_size: int, eos_id: int, pad_id: int, seed: int = 0,
                max_positions: int = 512):
    from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if arch == "llama" else Phi3Config(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session", params=["llama", "phi3"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer):
    """A saved tiny model directory, once per architecture."""
    return _save_tiny(request.param, tmp_path_factory, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    return _save_tiny("llama", tmp_path_factory, tiny_tokenizer)


def _save_tiny(arch, tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    model = build_model(arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def chat_example(question: str, answer: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_file(tmp_path):
    rows = [chat_example(f"What is fact number {i}?", f"Fact {i} is that the lamp lasts {i} hours.")
            for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture
def machine_threads():
    """Train with the thread count a user's `slmtune train` gets (bf16 sums differ with the number
    of threads, so a real model's results are the command line's only at its thread count)."""
    torch.set_num_threads(MACHINE_THREADS)
    yield MACHINE_THREADS
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMTUNE_HOME", str(tmp_path / "slmtune-home"))


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_llama_dir) -> Path:
    """A LoRA run on the tiny Llama (2 small steps: its answers differ from the base's yet stay varied),
    shared by the export tests (ONNX, GGUF) and the ONNX serving tests."""
    from slmtune.config import recipe_from_dict
    from slmtune.training.run import run

    root = tmp_path_factory.mktemp("lora-run")
    data = write_jsonl(root / "train.jsonl", [chat_example(f"What is fact number {i}?",
                                                           f"Fact {i} is that the lamp lasts {i} hours.")
                                              for i in range(16)])
    run(recipe_from_dict({
        "model": {"name": str(tiny_llama_dir)},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(data), "max_length": 128},
        "train": {"micro_batch_size": 4, "learning_rate": 5e-3, "seed": 3, "precision": "fp32", "max_steps": 2},
        "output": {"dir": str(root / "run")},
    }), progress=False)
    return root / "run"


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory, lora_run):
    """`lora_run`'s fp32 ONNX export, parity checked."""
    from types import SimpleNamespace

    from slmtune.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    result = export_onnx(lora_run, root / "export-fp32", "fp32")
    return SimpleNamespace(root=root, run_dir=lora_run, export_dir=result.path, parity=result.parity)


def pytest_collection_modifyitems(config, items):
    """Acceptance tests (long real-model runs) only with SLMTUNE_ACCEPTANCE=1: they would double the
    CI's time; `make test-acceptance` runs them, and docs/benchmarks.md records their last results."""
    if os.environ.get("SLMTUNE_ACCEPTANCE") == "1":
        return
    skip = pytest.mark.skip(reason="acceptance test (several minutes on the real model): SLMTUNE_ACCEPTANCE=1 "
                                   "or make test-acceptance")
    for item in items:
        if "acceptance" in item.keywords:
            item.add_marker(skip)
