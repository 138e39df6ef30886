import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmtune.cli import main
from tests.conftest import chat_example, write_jsonl


def test_train_quick_flags_writes_exactly_the_expected_files(tiny_llama_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_llama_dir), "--data", str(chat_file), "--epochs", "1",
                 "--output", str(out), "--no-progress", "train.save_every=2", "train.max_steps=5"])
    assert code == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    checkpoint_files = [f for f in files if f.startswith("checkpoints/")]
    assert sorted(f for f in files if not f.startswith("checkpoints/")) == [
        "adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
        "metrics.jsonl", "recipe.yaml", "summary.json",
    ]
    # keep_checkpoints=2 newest step checkpoints, each complete
    steps = sorted({f.split("/")[1] for f in checkpoint_files})
    assert steps == ["step-000002", "step-000004"]  # every 2 steps before the last (its weights are the run's)
    for step in steps:
        assert {f.split("/", 2)[2] for f in checkpoint_files if f.split("/")[1] == step} == {
            "adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("train_tokens", "train_seconds", "tokens_per_second", "peak_rss_mb", "final_train_loss", "eval_loss"):
        assert key in summary
    assert summary["train_tokens"] > 0 and summary["eval_loss"] is None
    recipe = (out / "recipe.yaml").read_text()
    assert "save_every: 2" in recipe and str(chat_file) in recipe
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_second"} <= set(metrics[0])
    assert [m["step"] for m in metrics if m["event"] == "step"] == [1, 2, 3, 4, 5]
    assert "Done:" in capsys.readouterr().err


def test_adapter_loads_with_peft(tiny_llama_dir, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(chat_file), "--epochs", "1",
                 "--output", str(out), "--no-progress"]) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_bad_recipe_is_a_clear_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\ndata:\n  train: t.jsonl\noutput:\n  dir: o\ntrain:\n  micro_batch: 4\n")
    assert main(["train", str(recipe)]) == 2
    assert f"error: {recipe}:7: train.micro_batch: unknown key" in capsys.readouterr().err


def test_bad_data_is_a_clear_error_and_leaves_no_adapter(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [chat_example("a", "b")] * 3 + ['{"messages": 3}'])
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:4: error missing_messages" in err
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_data_validate_exit_codes(tmp_path, tiny_llama_dir, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [chat_example("a", "b")] * 10)
    assert main(["data", "validate", str(good), "--model", str(tiny_llama_dir)]) == 0
    assert "10 valid example(s), format chat" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat_example("a", "b")] * 10 + ["not json"])
    assert main(["data", "validate", str(bad)]) == 1
    assert f"{bad}:11: error invalid_json" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(chat_file, tmp_path, capsys):
    assert main(["train", "--model", "no-such-model", "--data", str(chat_file), "--output", str(tmp_path / "o")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_hub_id_without_network_is_a_clear_error(chat_file, tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (set in conftest) stands in for a machine without network.
    assert main(["train", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--data", str(chat_file),
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "could not load 'HuggingFaceTB/SmolLM2-135M-Instruct' from the Hugging Face hub" in err
    assert "Traceback" not in err


def test_resume_cli_and_chat(tiny_llama_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(chat_file), "--output", str(out),
                 "--no-progress", "train.max_steps=2"]) == 0
    assert main(["train", "--resume", str(out)]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["chat", str(out), "--prompt", "What is fact number 3?", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_console_script_runs(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "slmtune.cli", "models", "list"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m-instruct" in proc.stdout
