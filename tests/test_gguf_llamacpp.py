"""GGUF exports run by llama.cpp itself (llama-cpp-python, the `gguf` extra; the test extra installs it).

The tiny-model checks are quick; the SmolLM2 one is slow (the real model, a 2-step LoRA run)."""

from __future__ import annotations

import json

import gguf
import pytest

from slmtune.config import recipe_from_dict
from slmtune.export.gguf import (ADAPTER_FILE, GGUF_FILE, MIN_NEXT_TOKEN_AGREEMENT, MODELFILE, LlamaCppCandidate,
                                 export_gguf, export_gguf_lora, write_gguf)
from slmtune.export.parity import PARITY_PROMPTS
from slmtune.generation import SamplingParams, chat_prompt_ids, complete_with
from slmtune.models import load_model, load_tokenizer
from slmtune.training.run import run
from tests.conftest import REPO
from tests.test_models import real_home

llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp runs need pip install -e ".[gguf]"')

TEXTS = ["Fact 12 is that the lamp lasts 3 hours.", "  two spaces, tabs\tand\nnew lines",
         "<|im_start|>user\nhi<|im_end|>\n", "éàü — unicode"]


def test_llamacpp_tokenizes_like_the_model(tiny_llama_dir, tiny_tokenizer, tmp_path):
    path = write_gguf(load_model(str(tiny_llama_dir)), tiny_tokenizer, tmp_path / GGUF_FILE, "f32")
    candidate = LlamaCppCandidate(path)
    try:
        for text in TEXTS:
            assert candidate.llm.tokenize(text.encode(), add_bos=False, special=True) == tiny_tokenizer(text).input_ids
        assert candidate.extra_eos_ids == {tiny_tokenizer.eos_token_id}
    finally:
        candidate.close()


def test_a_lora_run_answers_the_same_through_llamacpp(lora_run, tmp_path):
    """f32 GGUF: llama.cpp's own kernels give the PyTorch model's greedy choices."""
    result = export_gguf(lora_run, tmp_path / "out", "f32", llamacpp=True)
    report = json.loads((result.path / "parity-llamacpp.json").read_text())
    assert report == result.llamacpp_parity and report["format"] == "gguf-f32 (llama.cpp)"
    assert report["prompts"] == len(PARITY_PROMPTS)
    assert report["next_token_agreement"] >= MIN_NEXT_TOKEN_AGREEMENT["f32"]
    assert json.loads((result.path / "parity.json").read_text())["format"] == "gguf-f32 (transformers)"


def test_sampled_rows_are_reproducible_by_seed(lora_run, tmp_path, tiny_tokenizer):
    result = export_gguf(lora_run, tmp_path / "out", "f16", check_parity=False)
    candidate = LlamaCppCandidate(result.path / GGUF_FILE)
    try:
        prompt = chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": "What is fact number 3?"}])

        def sample(seed):
            params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed)
            return complete_with(candidate.decoder, tiny_tokenizer, [prompt], params, eos_ids=set())[0].token_ids

        assert sample(7) == sample(7)
        assert len({tuple(sample(s)) for s in range(4)}) > 1
    finally:
        candidate.close()


@pytest.mark.slow
def test_real_smollm2_q8_0_and_f16_exports_agree_through_llamacpp(tmp_path, monkeypatch):
    """The real model: a 2-step LoRA run, exported f16 (greedy answers identical through llama.cpp)
    and q8_0 (at least its documented next-token agreement)."""
    monkeypatch.setenv("SLMTUNE_HOME", str(real_home()))
    run(recipe_from_dict({
        "model": {"name": "smollm2-135m-instruct"},
        "method": {"name": "lora", "lora_r": 8, "lora_alpha": 16},
        "data": {"train": str(REPO / "examples" / "support_assistant" / "train.jsonl"), "max_length": 128},
        "train": {"micro_batch_size": 2, "learning_rate": 1e-3, "seed": 1, "precision": "fp32", "max_steps": 2},
        "output": {"dir": str(tmp_path / "run")},
    }), progress=False)
    f16 = export_gguf(tmp_path / "run", tmp_path / "f16", "f16", llamacpp=True, prompts=PARITY_PROMPTS[:2])
    assert f16.llamacpp_parity["identical_answers"] == f16.llamacpp_parity["prompts"]
    q8 = export_gguf(tmp_path / "run", tmp_path / "q8_0", "q8_0", llamacpp=True, prompts=PARITY_PROMPTS[:2])
    assert q8.llamacpp_parity["next_token_agreement"] >= MIN_NEXT_TOKEN_AGREEMENT["q8_0"]
    assert (tmp_path / "q8_0" / GGUF_FILE).stat().st_size < 0.6 * (tmp_path / "f16" / GGUF_FILE).stat().st_size


def test_the_gguf_lora_gives_the_merged_exports_answers(lora_run, tmp_path):
    """The adapter alone, applied by llama.cpp on the base's GGUF, answers as the merged GGUF does."""
    lora = export_gguf_lora(lora_run, tmp_path / "lora", llamacpp=True)
    assert {p.name for p in lora.path.iterdir()} == {ADAPTER_FILE, MODELFILE, "parity-llamacpp.json"}
    assert lora.llamacpp_parity["next_token_agreement"] >= MIN_NEXT_TOKEN_AGREEMENT["f32"]
    merged = export_gguf(lora_run, tmp_path / "merged", "f32", llamacpp=True)
    assert ([e["exported_tokens"] for e in lora.llamacpp_parity["examples"]]
            == [e["exported_tokens"] for e in merged.llamacpp_parity["examples"]])
    text = (lora.path / MODELFILE).read_text()
    assert "FROM ./base.gguf" in text and f"ADAPTER ./{ADAPTER_FILE}" in text
    reader = gguf.GGUFReader(lora.path / ADAPTER_FILE)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)  # lora_alpha 8 / r 4 x r 4
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"}


def test_the_gguf_lora_on_a_given_base_file(lora_run, tmp_path):
    """--base-gguf: parity on the user's base file, held to that file's precision; the Modelfile points at it."""
    from slmtune.training.rundir import RunDir

    base_dir = RunDir(lora_run).recipe().model.name
    base = write_gguf(load_model(base_dir), load_tokenizer(base_dir), tmp_path / "base-f16.gguf", "f16")
    result = export_gguf_lora(lora_run, tmp_path / "lora", base_gguf=base, llamacpp=True)
    assert result.llamacpp_parity["format"] == "gguf-f16 (llama.cpp)"
    assert f"FROM {base.resolve()}" in (result.path / MODELFILE).read_text()
