"""`slmtune export --format gguf`: GGUF files for llama.cpp / Ollama written with the `gguf` package.

Checked on tiny random Llama, Phi-3 and Qwen2 models: metadata and tensor names read back with
gguf's own reader, the weights read back by transformers' GGUF loader (which undoes llama.cpp's q/k
permutation independently of ours), the permutation against the two rotary conventions, the Ollama
template against the model's chat template, and a LoRA run exported end to end with its parity check.
llama.cpp itself runs the export in tests/test_gguf_llamacpp.py (slow; needs the `gguf` extra)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from slmtune.cli import main
from slmtune.export import gguf as gguf_export
from slmtune.export.gguf import (GGUF_FILE, MODELFILE, OLLAMA_TEMPLATES, GgufExportError, chat_format,
                                 default_system, export_gguf, modelfile, permute_for_llamacpp, pre_tokenizer_name,
                                 render_ollama, write_gguf)
from slmtune.export.parity import PARITY_PROMPTS
from slmtune.training.rundir import load_merged
from tests.conftest import build_model


def tiny(arch: str, tokenizer):
    if arch == "qwen2":  # tied embeddings and q/k/v biases: the two things Llama/Phi-3 lack
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             tie_word_embeddings=True)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return build_model(arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id).eval()


EXPECTED_TENSORS = {  # per block, besides token_embd / output_norm (/ output unless tied)
    "llama": {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
              "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"},
    "phi3": {"attn_norm.weight", "attn_qkv.weight", "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
             "ffn_down.weight"},
    "qwen2": {"attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight",
              "attn_v.bias", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
              "ffn_down.weight"},
}


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_metadata_tokenizer_and_tensor_names_read_back(arch, tiny_tokenizer, tmp_path):
    model = tiny(arch, tiny_tokenizer)
    path = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == 2
    assert field(reader, f"{arch}.context_length") == 512
    assert field(reader, f"{arch}.embedding_length") == 64
    assert field(reader, f"{arch}.attention.head_count") == 4
    assert field(reader, f"{arch}.attention.head_count_kv") == 2
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size
    assert tokens[tiny_tokenizer.eos_token_id] == "<|im_end|>"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tiny_tokenizer.eos_token_id
    assert field(reader, "tokenizer.chat_template") == tiny_tokenizer.chat_template
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tiny_tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    names = {t.name for t in reader.tensors}
    want = {f"blk.{b}.{n}" for b in range(2) for n in EXPECTED_TENSORS[arch]} | {"token_embd.weight",
                                                                                "output_norm.weight"}
    if arch != "qwen2":
        want.add("output.weight")
    assert names == want
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_transformers_gguf_loader_reads_back_the_same_weights(arch, tiny_tokenizer, tmp_path):
    """f32 is lossless: every weight equal after transformers undoes the name mapping and permutation."""
    model = tiny(arch, tiny_tokenizer)
    write_gguf(model, tiny_tokenizer, tmp_path / GGUF_FILE, "f32")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=GGUF_FILE, dtype=torch.float32)
    want, got = model.state_dict(), back.state_dict()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    ids = torch.tensor([tiny_tokenizer("the lamp lasts four hours").input_ids])
    assert torch.equal(model(ids).logits, back(ids).logits)
    text = "Fact 12 is that the lamp lasts 3 hours.\n<|im_start|>user"
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=GGUF_FILE)
    assert loaded(text).input_ids == tiny_tokenizer(text).input_ids


@pytest.mark.parametrize("quant,tolerance", [("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 2e-2), ("q4_0", 0.2)])
def test_quantized_weights_stay_within_their_rounding(quant, tolerance, tiny_tokenizer, tmp_path):
    model = tiny("llama", tiny_tokenizer)
    path = write_gguf(model, tiny_tokenizer, tmp_path / GGUF_FILE, quant)
    reader = gguf.GGUFReader(path)
    wanted = gguf_export.QUANTS[quant][0]
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == wanted and kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=GGUF_FILE, dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        error = (back.state_dict()[name] - tensor).abs().max().item()
        assert error <= tolerance * max(tensor.abs().max().item(), 1e-6), (name, error)
    f32_size = write_gguf(model, tiny_tokenizer, tmp_path / "f32.gguf", "f32").stat().st_size
    assert path.stat().st_size < f32_size


def rotate_half_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding on one head: dimension i pairs with i + d/2."""
    half = x.shape[-1] // 2
    cos, sin = angles.cos().repeat(2), angles.sin().repeat(2)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def interleaved_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `llama` rotary embedding on one head: dimension 2i pairs with 2i + 1."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * angles.cos() - odd * angles.sin()
    out[..., 1::2] = even * angles.sin() + odd * angles.cos()
    return out


def test_the_q_k_permutation_turns_rotate_half_into_interleaved_pairs():
    """Attention scores are what matter: q·k after each convention's rotary embedding must be equal
    when llama.cpp's side uses the permuted weights."""
    torch.manual_seed(0)
    n_head, d, hidden = 2, 8, 16
    wq, wk, x = torch.randn(n_head * d, hidden), torch.randn(n_head * d, hidden), torch.randn(hidden)
    angles = torch.arange(d // 2) * 0.3 + 0.1
    for h in range(n_head):
        rows = slice(h * d, (h + 1) * d)
        hf = rotate_half_rope((wq @ x)[rows], angles) @ rotate_half_rope((wk @ x)[rows], 2 * angles)
        pq, pk = permute_for_llamacpp(wq, n_head), permute_for_llamacpp(wk, n_head)
        cpp = interleaved_rope((pq @ x)[rows], angles) @ interleaved_rope((pk @ x)[rows], 2 * angles)
        assert torch.allclose(hf, cpp, atol=1e-5)
    assert sorted(permute_for_llamacpp(torch.arange(16.0)[:, None], 2).flatten().tolist()) == list(range(16))


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
     {"role": "user", "content": "C?"}],
]
LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
PHI3_STYLE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATML_DEFAULT_SYSTEM = (  # like SmolLM2's and Qwen2.5's: a system turn is added when there is none
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Lumo's helper.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template,fmt,system", [
    (None, "chatml", None),
    (CHATML_DEFAULT_SYSTEM, "chatml", "You are Lumo's helper."),
    (LLAMA3_STYLE, "llama3", None),
    (PHI3_STYLE, "phi3", None),
])
def test_the_modelfile_template_renders_conversations_as_the_chat_template(template, fmt, system, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    saved = tokenizer.chat_template
    bos = tokenizer.bos_token
    try:
        if template is not None:
            tokenizer.chat_template = template
        if fmt == "llama3":
            tokenizer.bos_token = "<|begin_of_text|>"
        assert chat_format(tokenizer) == fmt
        go_template, stops = OLLAMA_TEMPLATES[fmt]
        assert default_system(tokenizer, go_template) == system
        for conversation in CONVERSATIONS:
            want = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            # Ollama puts the Modelfile's SYSTEM first when the conversation brings none.
            messages = conversation
            if system is not None and conversation[0]["role"] != "system":
                messages = [{"role": "system", "content": system}] + conversation
            assert render_ollama(go_template, messages) == want
        text = modelfile(tokenizer)
        assert text.startswith(f"FROM ./{GGUF_FILE}\n") and f'TEMPLATE """{go_template}"""' in text
        assert all(f'PARAMETER stop "{s}"' in text for s in stops)
        assert (f'SYSTEM """{system}"""' in text) == (system is not None)
    finally:
        tokenizer.chat_template = saved
        tokenizer.bos_token = bos


def test_an_unknown_chat_format_leaves_the_template_to_the_gguf(tiny_tokenizer):
    saved = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        assert chat_format(tiny_tokenizer) is None
        text = modelfile(tiny_tokenizer)
        assert "TEMPLATE" not in text and "chat template embedded in the GGUF" in text
    finally:
        tiny_tokenizer.chat_template = saved


@pytest.mark.parametrize("pre,name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": gguf_export.QWEN2_SPLIT}},
                                             {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": gguf_export.LLAMA3_SPLIT}},
                                             {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
])
def test_pre_tokenizers_map_to_llamacpp_names(pre, name):
    assert pre_tokenizer_name({"pre_tokenizer": pre}) == name


def test_an_unknown_pre_tokenizer_is_refused():
    with pytest.raises(GgufExportError, match="pre-tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})


def test_a_lora_run_exports_with_parity_and_a_modelfile(lora_run, tmp_path):
    result = export_gguf(lora_run, tmp_path / "out", "f32", llamacpp=False)
    out = result.path
    assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_FILE, MODELFILE, "parity.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    report = json.loads((out / "parity.json").read_text())
    assert report == result.parity and report["prompts"] == len(PARITY_PROMPTS)
    assert report["format"] == "gguf-f32 (transformers)"
    assert report["token_agreement"] == 1.0 and report["next_token_agreement"] == 1.0
    # The adapter is merged into the file: its weights are the merged model's, not the base's.
    merged, _ = load_merged(lora_run)
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=GGUF_FILE, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(back.state_dict()[name], merged.state_dict()[name])


def test_the_cli_exports_q8_0_and_reports_parity(lora_run, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["export", str(lora_run), "--format", "gguf", "--quant", "q8_0", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "parity (gguf-q8_0 (transformers) vs PyTorch, greedy)" in captured.err
    report = json.loads((out / "parity.json").read_text())
    assert report["next_token_agreement"] >= gguf_export.MIN_NEXT_TOKEN_AGREEMENT["q8_0"]
    reader = gguf.GGUFReader(out / GGUF_FILE)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_an_export_below_its_agreement_threshold_is_refused_and_leaves_nothing(lora_run, tmp_path, monkeypatch):
    monkeypatch.setitem(gguf_export.MIN_NEXT_TOKEN_AGREEMENT, "q4_0", 1.01)  # more than any export can reach
    with pytest.raises(GgufExportError, match="below the 101% this precision must reach"):
        export_gguf(lora_run, tmp_path / "out", "q4_0", llamacpp=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--format", "gguf", "--quant", "q4_k_m"], "llama-quantize"),
    (["--format", "onnx", "--quant", "q8_0"], "--quant applies to --format gguf"),
    (["--format", "gguf", "--precision", "int8"], "GGUF takes --quant"),
])
def test_bad_export_options_are_clear_errors(argv, message, tmp_path, capsys):
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_k_quants_are_refused_with_the_way_to_make_them(tiny_tokenizer, tmp_path):
    with pytest.raises(GgufExportError, match="llama-quantize"):
        write_gguf(tiny("llama", tiny_tokenizer), tiny_tokenizer, tmp_path / "m.gguf", "q4_k_m")
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_architectures_are_named(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1,
                                                        n_head=2))
    with pytest.raises(GgufExportError, match="model_type 'gpt2'.*llama, qwen2, phi3"):
        write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f16")


def test_quant_table_types_round_trip_through_numpy():
    """Every --quant choice is one the gguf package can produce (k-quants are not, hence absent)."""
    for name, (kind, _) in gguf_export.QUANTS.items():
        array = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        assert gguf_export.encode(array, kind).size > 0, name


def test_a_plain_model_folder_exports_like_a_run(tiny_llama_dir, tmp_path):
    """The base model itself, for --format gguf-lora's --base-gguf."""
    result = export_gguf(tiny_llama_dir, tmp_path / "base", "f32", llamacpp=False)
    assert result.parity["token_agreement"] == 1.0
    assert (result.path / GGUF_FILE).is_file()
