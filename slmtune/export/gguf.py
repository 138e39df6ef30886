"""Export a run as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

    slmtune export runs/mine --format gguf --quant q8_0 --output exports/mine-gguf
    llama-cli -m exports/mine-gguf/model.gguf            # or: cd exports/mine-gguf && ollama create mine

The adapter is merged first (slmtune.training.rundir.load_merged), then the merged weights are written
with the `gguf` package (llama.cpp's own Python writer): architecture metadata, the tokenizer
(byte-level BPE: tokens, token types, merges, special ids, chat template) and the tensors, named by
`gguf`'s TensorNameMap for the architecture. What llama.cpp's converter does beyond renaming, done
here the same way:
- Llama-family q/k projections are permuted from Hugging Face's rotate-half rotary layout to the
  interleaved pairs llama.cpp's `llama` architecture rotates (Qwen2 and Phi-3 use the NeoX layout
  in llama.cpp too, so they are written as they are).
- 1-D tensors (norms, biases) stay float32; a 2-D tensor whose rows do not split into whole
  quantization blocks falls back to f16, as llama-quantize does.

Quantization types are those the `gguf` package computes in Python (QUANTS); the k-quants
(q4_k_m, ...) it cannot produce: write f16 here and run llama.cpp's `llama-quantize` on it.

Parity (slmtune/export/parity.py), written to parity.json: the GGUF read back by transformers' own
GGUF loader (dequantized weights, a PyTorch model) answers the fixed prompts against the run; and,
when llama-cpp-python is installed (`pip install -e ".[gguf]"`), llama.cpp itself answers them
(parity-llamacpp.json). An export below its precision's agreement threshold is refused.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from slmtune import atomic
from slmtune.config import RecipeError
from slmtune.export.parity import PARITY_MAX_NEW_TOKENS, TorchCandidate, parity
from slmtune.generation import Decoding, samples
from slmtune.methods import METHODS
from slmtune.models import load_tokenizer
from slmtune.training.rundir import RunDir, load_base, load_merged

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"

# name -> (tensor type of 2-D weights, the file type recorded in general.file_type)
QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# The least next-token agreement (teacher-forced, llama.cpp or transformers' GGUF loader vs the run in
# PyTorch) an export must reach to be called good. Measured on SmolLM2-135M (docs/benchmarks.md);
# the thresholds sit below what was measured, not at it, since prompts and fine-tunes differ.
# SmolLM2-135M, 12 prompts x 64 tokens, llama.cpp: f32 100%, f16 99.7%, bf16 99.2%, q8_0 97.2%, q5_0 83.2%,
# q4_1 87.7%, q4_0 70.0%.
MIN_NEXT_TOKEN_AGREEMENT = {"f32": 0.97, "f16": 0.95, "bf16": 0.9, "q8_0": 0.9, "q5_0": 0.75, "q4_1": 0.75,
                            "q4_0": 0.6}

# Hugging Face model_type -> the GGUF architecture, and whether q/k need llama.cpp's permutation.
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "phi3": (gguf.MODEL_ARCH.PHI3, False),
}

# The byte-level BPE pre-tokenizers llama.cpp implements, by the split regex Hugging Face's tokenizer
# applies before BPE (None: ByteLevel's own regex, i.e. GPT-2's). llama.cpp names them
# tokenizer.ggml.pre and re-implements each; an unknown one would tokenize differently, so it is refused.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {None: "gpt-2", LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


class GgufExportError(RecipeError):
    """The model or tokenizer cannot be written as GGUF (the message says why and what to do)."""


@dataclass
class GgufExport:
    path: Path  # the export folder: model.gguf, Modelfile, parity*.json
    parity: dict | None
    llamacpp_parity: dict | None


# --- metadata ---------------------------------------------------------------------------------
def rope_theta(config) -> float:
    """transformers 5 keeps rope_theta in rope_parameters; older configs have it at the top level."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def check_rope(config) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in ("default", None):
        raise GgufExportError(f"rope scaling {kind!r} (e.g. Phi-3 128k's longrope) is not written to GGUF yet; "
                              "export the merged model and convert it with llama.cpp's convert_hf_to_gguf.py")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hyperparameters(writer: gguf.GGUFWriter, config, file_type) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    rotary = int(head_dim(config) * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
    writer.add_rope_dimension_count(rotary)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(file_type)


# --- tokenizer --------------------------------------------------------------------------------
def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GgufExportError(f"{type(tokenizer).__name__}: GGUF export needs a fast (tokenizer.json) tokenizer")
    return json.loads(backend.to_str())


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, read from its tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split = None
    for step in steps:
        if step.get("type") == "Split":
            split = (step.get("pattern") or {}).get("Regex")
        elif step.get("type") == "ByteLevel":
            if step.get("use_regex", True) and split is not None:
                split = "two regexes"  # a split and then ByteLevel's own: not one llama.cpp knows
        else:
            split = f"a {step.get('type')} step"
    if split not in PRE_TOKENIZERS or not any(s.get("type") == "ByteLevel" for s in steps):
        raise GgufExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp "
                              f"implements here ({', '.join(PRE_TOKENIZERS.values())}); its GGUF would tokenize "
                              "differently from the model's training")
    return PRE_TOKENIZERS[split]


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` tokenizer model: every id up to the model's vocab size
    (unused ids padded), token types, merges, special ids and the chat template."""
    spec = tokenizer_json(tokenizer)
    if (spec.get("model") or {}).get("type") != "BPE" or pre_tokenizer_name(spec) is None:
        raise GgufExportError("only byte-level BPE tokenizers are written to GGUF here (SmolLM2, Qwen2.5, "
                              "Llama 3, Phi-4-mini); SentencePiece ones (Phi-3-mini) are not yet")
    vocab = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = spec["model"].get("merges") or []
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    # The prompt is the chat template's output; llama.cpp must not put a BOS before it on its own
    # unless the tokenizer does (Llama 3's does, ChatML models' do not).
    writer.add_add_bos_token(bool(tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id])
                             if tokenizer.bos_token_id is not None else False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# --- tensors ----------------------------------------------------------------------------------
def permute_for_llamacpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face rotates the two halves of each head; llama.cpp's `llama` rotates adjacent pairs.
    Reorder each head's rows so that pair i is (row i, row i + half) of the original."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model, arch, permute: bool):
    """(GGUF name, float32 numpy array) for each weight, in the model's order."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the same tensor as token_embd
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GgufExportError(f"{name}: no GGUF tensor name for it in {gguf.MODEL_ARCH_NAMES[arch]}")
        tensor = tensor.detach().float()
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_for_llamacpp(tensor, config.num_attention_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_for_llamacpp(tensor, n_kv)
        yield target, tensor.numpy()


def tensor_type(array: np.ndarray, wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if array.ndim == 1:
        return gguf.GGMLQuantizationType.F32  # norms and biases: tiny, and sensitive to rounding
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if array.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return wanted


def encode(array: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    if kind == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, kind)


def write_gguf(model, tokenizer, path: str | os.PathLike, quant: str = "f16", *, name: str = "") -> Path:
    """Write `model` (a plain Hugging Face causal LM) and its tokenizer as one GGUF file."""
    if quant not in QUANTS:
        raise GgufExportError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}; for k-quants (q4_k_m, ...) "
                              "export f16 and run llama.cpp's llama-quantize on it")
    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise GgufExportError(f"model_type {config.model_type!r}: GGUF export supports "
                              f"{', '.join(ARCHITECTURES)}")
    check_rope(config)
    arch, permute = ARCHITECTURES[config.model_type]
    wanted, file_type = QUANTS[quant]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or Path(path).stem)
    write_hyperparameters(writer, config, file_type)
    write_tokenizer(writer, tokenizer, config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for target, array in gguf_tensors(model, arch, permute):
        kind = tensor_type(array, wanted)
        writer.add_tensor(target, encode(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# --- the adapter alone (GGUF LoRA) ------------------------------------------------------------
ADAPTER_FILE = "adapter.gguf"
PEFT_PREFIX = "base_model.model."


def lora_pairs(adapter_dir: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config.json, {module name: {"A": lora_A, "B": lora_B}}) of a PEFT LoRA adapter, refusing
    what llama.cpp's LoRA cannot apply (DoRA's magnitudes, PiSSA/OLoRA's changed base, extra modules)."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise GgufExportError(f"--format gguf-lora takes LoRA/QLoRA adapters; this run's is {config.get('peft_type')}: "
                              "export it merged with --format gguf")
    refusals = {
        "use_dora": "DoRA's magnitude vectors have no GGUF LoRA form",
        "modules_to_save": "the adapter also trains whole modules",
        "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise GgufExportError(f"{why} ({key}): llama.cpp cannot apply it as a LoRA; use --format gguf (merged)")
    if config.get("init_lora_weights") in ("pissa", "olora") or str(config.get("init_lora_weights", "")).startswith(
            ("pissa", "olora")):
        raise GgufExportError("PiSSA/OLoRA adapters change the base weights: use --format gguf (merged)")
    if config.get("bias", "none") != "none":
        raise GgufExportError("the adapter trains biases: use --format gguf (merged)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        for side in ("A", "B"):
            marker = f".lora_{side}.weight"
            if name.endswith(marker):
                module = name[len(PEFT_PREFIX):-len(marker)] if name.startswith(PEFT_PREFIX) else name[:-len(marker)]
                pairs.setdefault(module, {})[side] = tensor.float()
    return config, pairs


def write_gguf_lora(adapter_dir: str | os.PathLike, base_config, path: str | os.PathLike) -> Path:
    """Write a PEFT LoRA adapter as a GGUF LoRA for llama.cpp (`--lora`, Ollama's ADAPTER): per adapted
    weight W, `<gguf name of W>.lora_a` (r x in) and `.lora_b` (out x r), and adapter.lora.alpha.

    llama.cpp scales B·A by alpha / r; PEFT by lora_alpha / r (or / sqrt(r) with rsLoRA), so alpha is
    written as PEFT's scale x r. Llama's q/k permutation applies to B's rows, the output side."""
    config, pairs = lora_pairs(Path(adapter_dir))
    if base_config.model_type not in ARCHITECTURES:
        raise GgufExportError(f"model_type {base_config.model_type!r}: GGUF export supports {', '.join(ARCHITECTURES)}")
    arch, permute = ARCHITECTURES[base_config.model_type]
    names = gguf.get_tensor_name_map(arch, base_config.num_hidden_layers)
    n_kv = getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads
    r = int(config["r"])
    scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * r))
    for module, pair in sorted(pairs.items()):
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or set(pair) != {"A", "B"}:
            raise GgufExportError(f"{module}: no GGUF tensor for this adapted module (or half of its pair missing)")
        b = pair["B"]
        if permute and module.endswith("q_proj"):
            b = permute_for_llamacpp(b, base_config.num_attention_heads)
        elif permute and module.endswith("k_proj"):
            b = permute_for_llamacpp(b, n_kv)
        writer.add_tensor(f"{target}.lora_a", pair["A"].numpy())
        writer.add_tensor(f"{target}.lora_b", b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# --- Ollama -----------------------------------------------------------------------------------
# Go templates (Ollama's TEMPLATE) for the chat formats we can recognise, each checked against the
# model's own Jinja template in tests/export/test_gguf.py. Ollama renders .Messages with the system
# turn first when there is one.
OLLAMA_TEMPLATES = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n", ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
               "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "phi3": ("{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
             ["<|end|>", "<|user|>", "<|assistant|>"]),
}
PROBE = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


def render_ollama(template: str, messages: list[dict]) -> str:
    """What Ollama's TEMPLATE yields for `messages` (the templates in OLLAMA_TEMPLATES use only
    `range .Messages`, `.Role` and `.Content`, so this is their whole semantics)."""
    head, rest = template.split("{{- range .Messages }}", 1)
    body, tail = rest.split("{{ end }}", 1)
    out = head
    for m in messages:
        out += body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
    return out + tail


def chat_format(tokenizer) -> str | None:
    """The OLLAMA_TEMPLATES entry whose rendering of PROBE equals the model's chat template's."""
    try:
        want = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template refusing system turns is simply not one we know
        return None
    for name, (template, _) in OLLAMA_TEMPLATES.items():
        if render_ollama(template, PROBE) == want:
            return name
    return None


def default_system(tokenizer, template: str) -> str | None:
    """The system message the chat template inserts when a conversation has none (SmolLM2's and
    Qwen2.5's do), found by rendering a user turn alone; Ollama's SYSTEM does the same."""
    user = [{"role": "user", "content": "U2"}]
    want = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    if want == render_ollama(template, user):
        return None
    prefix, suffix = render_ollama(template, [{"role": "system", "content": "\0"}] + user).split("\0")
    if want.startswith(prefix) and want.endswith(suffix) and len(want) >= len(prefix) + len(suffix):
        return want[len(prefix): len(want) - len(suffix)]
    return None


def modelfile(tokenizer, model: str = f"./{GGUF_FILE}", adapter: str | None = None) -> str:
    """An Ollama Modelfile for the export: FROM (and ADAPTER for a GGUF LoRA), TEMPLATE, the
    template's default SYSTEM and stops when the chat format is one we know (else Ollama falls back
    to the chat template embedded in the GGUF), low-temperature defaults."""
    lines = [f"FROM {model}"] + ([f"ADAPTER {adapter}"] if adapter else [])
    fmt = chat_format(tokenizer)
    if fmt is not None:
        template, stops = OLLAMA_TEMPLATES[fmt]
        lines.append(f'TEMPLATE """{template}"""')
        system = default_system(tokenizer, template)
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    else:
        lines.append("# chat format not recognised: Ollama uses the chat template embedded in the GGUF")
    lines += ["PARAMETER temperature 0.2", "PARAMETER top_p 0.9"]
    return "\n".join(lines) + "\n"


# --- llama.cpp (optional, for parity and its numbers) ----------------------------------------
def llama_cpp():
    try:
        import llama_cpp  # optional extra: compiled from source, several minutes
    except ImportError as err:
        raise GgufExportError('running a GGUF with llama.cpp needs llama-cpp-python: pip install -e ".[gguf]"') from err
    return llama_cpp


def context_length_of(gguf_path: str | os.PathLike) -> int | None:
    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()
    key = f"{arch}.context_length"
    return int(reader.fields[key].contents()) if key in reader.fields else None


def load_llama(**kwargs):
    """llama_cpp.Llama(**kwargs), without llama.cpp's extra weight layouts on CPUs with AMX.

    llama.cpp built natively on an Intel Xeon with AMX (llama-cpp-python 0.3.36) moves Q8_0 weights
    into its AMX buffer type, and decoding a Q8_0 SmolLM2 export then crashes the process with a
    segmentation fault (tests/test_gguf_export.py, 2026-12-04); f16 and AMD CPUs are unaffected.
    llama-cpp-python does not expose llama.cpp's `use_extra_bufts`, so its default model parameters
    are switched off for this one load."""
    module = llama_cpp()
    if "AMX_INT8 = 1" not in module.llama_print_system_info().decode(errors="replace"):
        return module.Llama(**kwargs)
    low_level = module.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra_buffers
    try:
        return module.Llama(**kwargs)
    finally:
        low_level.llama_model_default_params = defaults


class LlamaCppDecoder:
    """The Decoder protocol (slmtune/generation.py) on llama.cpp through llama-cpp-python: rows one
    after another, each evaluated from its prompt, greedy by argmax of llama.cpp's logits (or sampled
    with the row's temperature and seed)."""

    def __init__(self, llm):
        self.llm = llm

    def logits_after(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])

    def decode(self, rows: list[Decoding], join=None) -> None:
        # One llama.cpp context decodes one row at a time: rows never join (`join` is not called).
        for row in rows:
            c = row.completion
            rng = np.random.default_rng(c.params.seed)
            self.llm.reset()
            self.llm.eval(c.prompt_ids)
            while not row.finished:
                if c.cancelled:
                    row.add(-1)
                    break
                logits = np.asarray(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)
                if samples(c.params):
                    probs = np.exp((logits - logits.max()) / c.params.temperature)
                    token = int(rng.choice(len(probs), p=probs / probs.sum()))
                else:
                    token = int(logits.argmax())
                row.add(token)
                if not row.finished:
                    self.llm.eval([token])


class LlamaCppCandidate:
    """A GGUF file run by llama.cpp, as a parity candidate (slmtune/export/parity.py)."""

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None, *,
                 lora_path: str | os.PathLike | None = None):
        # No longer than the model's own context: beyond it llama.cpp warns, and the cache is wasted.
        n_ctx = min(n_ctx, context_length_of(gguf_path) or n_ctx)
        self.llm = load_llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, verbose=False,
                              n_threads=n_threads or max(1, len(os.sched_getaffinity(0))),
                              lora_path=str(lora_path) if lora_path else None)
        self.decoder = LlamaCppDecoder(self.llm)
        self.extra_eos_ids = {int(self.llm.token_eos())}

    def close(self) -> None:
        """Free llama.cpp's model now (left to interpreter exit, its destructor can fail noisily)."""
        self.llm.close()

    def next_token_matches(self, prompt_ids: list[int], reference: list[int]) -> int:
        if not reference:
            return 0
        self.llm.reset()
        self.llm.eval(prompt_ids + reference[:-1])
        scores = np.asarray(self.llm.scores[len(prompt_ids) - 1: len(prompt_ids) + len(reference) - 1])
        return int((scores.argmax(-1) == np.asarray(reference)).sum())


def transformers_candidate(export_dir: Path) -> TorchCandidate:
    """The GGUF read back by transformers' own GGUF loader (weights dequantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(export_dir), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir), gguf_file=GGUF_FILE)
    return TorchCandidate(model, tokenizer)


# --- the export ------------------------------------------------------------------------------
def check_agreement(report: dict, quant: str, runtime: str) -> None:
    need = MIN_NEXT_TOKEN_AGREEMENT[quant]
    if report["next_token_agreement"] < need:
        raise GgufExportError(
            f"the {quant} GGUF through {runtime} agrees with the PyTorch model on "
            f"{100 * report['next_token_agreement']:.1f}% of next tokens, below the {100 * need:.0f}% this "
            "precision must reach (docs/export.md); try a less aggressive --quant")


def wants_llamacpp(llamacpp: bool | None) -> bool:
    """None: llama.cpp parity when llama-cpp-python is installed; True: required."""
    if llamacpp is None:
        try:
            llama_cpp()
        except GgufExportError:
            return False
        return True
    if llamacpp:
        llama_cpp()  # raises with the install hint
    return bool(llamacpp)


def llamacpp_parity(run_dir, work: Path, candidate: LlamaCppCandidate, quant: str, **kwargs) -> dict:
    """Parity through llama.cpp, written to WORK/parity-llamacpp.json (parity.json stays the transformers
    loader's when there is one) and held to `quant`'s threshold."""
    kept = work / "parity.json"
    aside = work / ".parity-kept.json"
    if kept.exists():
        os.replace(kept, aside)
    try:
        report = parity(run_dir, work, candidate, f"gguf-{quant} (llama.cpp)", **kwargs)
        os.replace(kept, work / "parity-llamacpp.json")
    finally:
        candidate.close()
        if aside.exists():
            os.replace(aside, kept)
    check_agreement(report, quant, "llama.cpp")
    return report


def export_gguf(run_dir: str | os.PathLike, out: str | os.PathLike, quant: str = "f16", *,
                check_parity: bool = True, llamacpp: bool | None = None, prompts: list[str] | None = None,
                max_new_tokens: int = PARITY_MAX_NEW_TOKENS) -> GgufExport:
    """Merge the run, write OUT/model.gguf and OUT/Modelfile, and (by default) check parity with
    transformers' GGUF loader and, when installed (or `llamacpp=True`), with llama.cpp.

    Everything is written in a temporary folder beside `out` and renamed at the end, so a failed or
    refused export leaves nothing behind."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out}: exists and is not empty")
    if quant not in QUANTS:
        raise GgufExportError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}; for k-quants (q4_k_m, ...) "
                              "export f16 and run llama.cpp's llama-quantize on it")
    model, tokenizer = load_merged(run_dir)
    model = model.float().eval()
    with atomic.directory(out) as work:
        write_gguf(model, tokenizer, work / GGUF_FILE, quant, name=Path(run_dir).name)
        (work / MODELFILE).write_text(modelfile(tokenizer))
        report = llamacpp_report = None
        if check_parity:
            report = parity(run_dir, work, transformers_candidate(work), f"gguf-{quant} (transformers)",
                            prompts=prompts, max_new_tokens=max_new_tokens, reference=(model, tokenizer))
            check_agreement(report, quant, "transformers' GGUF loader")
            if wants_llamacpp(llamacpp):
                llamacpp_report = llamacpp_parity(run_dir, work, LlamaCppCandidate(work / GGUF_FILE), quant,
                                                  prompts=prompts, max_new_tokens=max_new_tokens,
                                                  reference=(model, tokenizer))
    return GgufExport(out, report, llamacpp_report)


def quant_of(gguf_path: str | os.PathLike) -> str | None:
    """The --quant name of a GGUF file, from its general.file_type (None: a type not written here)."""
    reader = gguf.GGUFReader(str(gguf_path))
    key = "general.file_type"
    file_type = reader.fields[key].contents() if key in reader.fields else None
    return next((name for name, (_, ft) in QUANTS.items() if ft == file_type), None)


def export_gguf_lora(run_dir: str | os.PathLike, out: str | os.PathLike, *, base_gguf: str | os.PathLike | None = None,
                     check_parity: bool = True, llamacpp: bool | None = None, prompts: list[str] | None = None,
                     max_new_tokens: int = PARITY_MAX_NEW_TOKENS) -> GgufExport:
    """Write the run's LoRA adapter alone as OUT/adapter.gguf (f32), with a Modelfile (FROM the base's
    GGUF, ADAPTER the file), so many fine-tunes share one base file in llama.cpp or Ollama.

    Parity needs llama.cpp (transformers cannot apply GGUF LoRAs): the base GGUF (`base_gguf`, else a
    temporary f32 one written from the run's base model) with the adapter applied by llama.cpp,
    against the run in PyTorch, held to the base's precision threshold."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out}: exists and is not empty")
    run = RunDir(run_dir)
    recipe = run.recipe()
    if run.artifact().name != "adapter":
        raise GgufExportError(f"{run_dir}: a full fine-tune has no adapter; use --format gguf")
    if METHODS[recipe.method.name].quantized_base:
        # A QLoRA adapter learned against the 4-bit base: on an f16/f32 base GGUF it answers differently.
        print("note: a QLoRA adapter was trained on the 4-bit base; on a higher-precision base GGUF its answers "
              "drift (parity says how much)", file=sys.stderr)
    base_quant = quant_of(base_gguf) if base_gguf else "f32"
    with atomic.directory(out) as work:
        base = load_base(recipe)
        if METHODS[recipe.method.name].quantized_base:
            base = base.dequantize()
        base = base.float().eval()
        tokenizer = load_tokenizer(recipe.model.name)
        write_gguf_lora(run.artifact(), base.config, work / ADAPTER_FILE)
        from_line = str(Path(base_gguf).resolve()) if base_gguf else "./base.gguf"
        text = modelfile(tokenizer, from_line, f"./{ADAPTER_FILE}")
        if not base_gguf:
            text = ("# FROM: the base model's GGUF, e.g. slmtune export "
                    f"{recipe.model.name} --format gguf --output base && cp base/{GGUF_FILE} ./base.gguf\n") + text
        (work / MODELFILE).write_text(text)
        report = None
        if check_parity and wants_llamacpp(llamacpp):
            base_path = Path(base_gguf) if base_gguf else write_gguf(base, tokenizer, work / ".base.gguf", "f32")
            candidate = LlamaCppCandidate(base_path, lora_path=work / ADAPTER_FILE)
            report = llamacpp_parity(run_dir, work, candidate, base_quant or "q4_0", prompts=prompts,
                                     max_new_tokens=max_new_tokens)
            if not base_gguf:
                base_path.unlink()
        elif check_parity:
            print('note: no parity check for a GGUF LoRA without llama.cpp: pip install -e ".[gguf]"', file=sys.stderr)
    return GgufExport(out, None, report)
