"""`slmtune export --format onnx|merged`: onnxruntime-genai's builder on a merged LoRA run, and the
greedy-generation parity check against the PyTorch model (tiny Llama from conftest; fp32 and int8)."""

import json

import pytest

from slmtune.cli import main
from slmtune.export.onnx import OnnxCandidate, genai_eos_ids
from slmtune.export.parity import PARITY_PROMPTS, greedy_tokens, prompt_ids
from slmtune.generation import TorchDecoder, pad_id_of


def test_fp32_onnx_export_matches_pytorch_greedy(onnx_export, tiny_llama_dir):
    from slmtune.models import end_of_turn_ids
    from slmtune.training.rundir import load_for_inference

    out = onnx_export.export_dir
    for name in ("model.onnx", "genai_config.json", "tokenizer.json", "parity.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export-fp32.")]  # temp folder gone
    report = json.loads((out / "parity.json").read_text())
    assert report == onnx_export.parity
    assert report["format"] == "onnx" and report["prompts"] == len(PARITY_PROMPTS)
    assert report["compared_tokens"] >= len(PARITY_PROMPTS)
    assert report["token_agreement"] >= 0.9
    assert report["token_agreement"] == 1.0  # fp32: the same greedy tokens as PyTorch
    assert report["next_token_agreement"] == 1.0
    assert all(e["pytorch_tokens"] == e["exported_tokens"] for e in report["examples"])

    # The adapter is merged into the export: it answers like the run, not like the base model.
    base, tokenizer = load_for_inference(str(tiny_llama_dir))
    eos = end_of_turn_ids(base, tokenizer) | genai_eos_ids(out)
    ids = [prompt_ids(tokenizer, prompt) for prompt in PARITY_PROMPTS]
    base_answers = greedy_tokens(TorchDecoder(base, pad_id_of(tokenizer, eos)), tokenizer, ids,
                                 report["max_new_tokens"], eos)
    onnx_answers = greedy_tokens(OnnxCandidate(out, tokenizer).decoder, tokenizer, ids, report["max_new_tokens"], eos)
    assert onnx_answers == [e["exported_tokens"] for e in report["examples"]]
    assert onnx_answers != base_answers


def test_int8_onnx_export_from_the_cli_reports_agreement(onnx_export, capsys):
    out = onnx_export.root / "export-int8"
    assert main(["export", str(onnx_export.run_dir), "--format", "onnx", "--precision", "int8",
                 "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "parity (onnx vs PyTorch, greedy)" in captured.err and "tokens agree" in captured.err
    report = json.loads((out / "parity.json").read_text())
    assert 0.0 <= report["token_agreement"] <= 1.0
    assert report["compared_tokens"] >= len(PARITY_PROMPTS)
    # Fed PyTorch's answer, the export picks the same token at least wherever free generation agreed.
    assert "next-token agreement" in captured.err
    for example in report["examples"]:
        assert example["agreed_tokens"] <= example["next_token_matches"] <= example["reference_tokens"]
    print(f"int8 parity: {report['agreed_tokens']}/{report['compared_tokens']}")  # shown with -s
    # int8 weights are really smaller than fp32 ones (MatMul weights quantized).
    size = lambda d: sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx"))  # noqa: E731
    assert size(out) < size(onnx_export.export_dir)


def test_builder_options_reach_the_model_builder(onnx_export, tmp_path):
    import onnx

    out = tmp_path / "int8-b16"
    assert main(["export", str(onnx_export.run_dir), "--format", "onnx", "--precision", "int8", "--output", str(out),
                 "--builder-option", "block_size=16", "--no-parity"]) == 0
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert quantized
    for node in quantized:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["bits"] == 8 and attributes["block_size"] == 16, node.name


def test_merged_format_writes_parity_too(onnx_export, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(onnx_export.run_dir), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    report = json.loads((out / "parity.json").read_text())
    assert report["format"] == "merged" and report["token_agreement"] == 1.0
    assert report["next_token_agreement"] == 1.0
    assert "parity (merged vs PyTorch" in capsys.readouterr().err
    # The old spelling still works.
    assert main(["export", str(onnx_export.run_dir), "--merge", str(tmp_path / "old"), "--no-parity"]) == 0
    assert (tmp_path / "old" / "model.safetensors").is_file() and not (tmp_path / "old" / "parity.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--merge", "X", "--format", "onnx"], "--merge OUT writes the merged format"),
    (["--output", "X", "--precision", "int8"], "--precision int8/int4 applies to --format onnx"),
    (["--format", "onnx"], "needs --output OUT"),
    (["--merge", "X", "--output", "Y"], "give the output folder once"),
    (["--output", "X", "--builder-option", "block_size=16"], "--builder-option applies to --format onnx"),
    (["--output", "X", "--format", "onnx", "--builder-option", "block_size"], "expected KEY=VALUE"),
])
def test_export_option_errors(argv, message, tmp_path, capsys):
    assert main(["export", str(tmp_path)] + argv) == 2
    assert message in capsys.readouterr().err


def test_onnx_export_refuses_a_non_empty_output(onnx_export, capsys):
    assert main(["export", str(onnx_export.run_dir), "--format", "onnx", "--output",
                 str(onnx_export.export_dir)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_lora_run_exports_to_onnx_fp32_with_full_parity(tmp_path, monkeypatch):
    """The real model (pulled once into the test cache): a 2-step LoRA run, ONNX fp32, parity 100%."""
    from slmtune.config import recipe_from_dict
    from slmtune.export.onnx import export_onnx
    from slmtune.training.run import run
    from tests.test_models import real_home

    monkeypatch.setenv("SLMTUNE_HOME", str(real_home()))
    from tests.conftest import REPO

    run(recipe_from_dict({
        "model": {"name": "smollm2-135m-instruct"},
        "method": {"name": "lora", "lora_r": 8, "lora_alpha": 16},
        "data": {"train": str(REPO / "examples" / "support_assistant" / "train.jsonl"), "max_length": 128},
        "train": {"micro_batch_size": 2, "learning_rate": 1e-3, "seed": 1, "precision": "fp32", "max_steps": 2},
        "output": {"dir": str(tmp_path / "run")},
    }), progress=False)
    result = export_onnx(tmp_path / "run", tmp_path / "onnx", "fp32", prompts=PARITY_PROMPTS[:2])
    assert result.parity["token_agreement"] == 1.0, result.parity
