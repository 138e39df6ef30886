"""`slmtune plan`: which fine-tuning method fits your hardware, with the memory arithmetic shown.

    slmtune plan --model smollm2-135m-instruct --hardware cpu:24GB --seq-len 1024
    slmtune plan --model qwen2.5-7b --hardware 2x24GB --seq-len 2048 --micro-batch 2
    slmtune plan --model smollm2-135m-instruct --hardware cpu:24GB --seq-len 512 --measure

The estimate follows how slmtune trains: fp32 master weights (bf16 autocast for compute), AdamW
with two fp32 moments per trainable parameter, gradients only for trainable parameters, the LM
head evaluated at target positions only. Activation memory per token was calibrated on this
project's CPU runs (see `--measure`, which trains a few real steps and prints measured vs
estimated peak). Architectures come from a local config.json or from the small table below.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from slmtune.models import has_native_bf16

GB = 1024**3


@dataclass(frozen=True)
class Architecture:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_params_per_layer(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        return h * h * 2 + 2 * h * kv + 3 * h * self.intermediate_size  # q, o, k, v, gate/up/down

    def total_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        norms = self.num_hidden_layers * 2 * self.hidden_size + self.hidden_size
        return embed + head + norms + self.num_hidden_layers * self.linear_params_per_layer()

    def lora_params(self, r: int) -> int:
        h, kv, i = self.hidden_size, self.num_key_value_heads * self.head_dim, self.intermediate_size
        per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        return self.num_hidden_layers * per_layer

    @classmethod
    def from_config(cls, cfg: dict) -> "Architecture":
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


# Architecture numbers from the models' published config.json files.
KNOWN = {
    "smollm2-135m-instruct": Architecture(49152, 576, 1536, 30, 9, 3, True),
    "smollm2-360m": Architecture(49152, 960, 2560, 32, 15, 5, True),
    "smollm2-1.7b": Architecture(49152, 2048, 8192, 24, 32, 32, True),
    "llama-3.2-1b": Architecture(128256, 2048, 8192, 16, 32, 8, True),
    "llama-3.2-3b": Architecture(128256, 3072, 8192, 28, 24, 8, True),
    "qwen2.5-0.5b": Architecture(151936, 896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": Architecture(151936, 1536, 8960, 28, 12, 2, True),
    "qwen2.5-7b": Architecture(152064, 3584, 18944, 28, 28, 4, False),
    "phi-3-mini": Architecture(32064, 3072, 8192, 32, 32, 32, False),
    "phi-3-medium": Architecture(32064, 5120, 17920, 40, 40, 10, False),
    "phi-4-mini": Architecture(200064, 3072, 8192, 32, 24, 8, True),
}
ALIASES = {"smollm2-135m": "smollm2-135m-instruct", "phi-3.5-mini": "phi-3-mini"}


def architecture(model: str) -> Architecture:
    key = ALIASES.get(model.lower(), model.lower())
    key = key.split("/")[-1].replace("-instruct", "") if key not in KNOWN else key
    if key in KNOWN:
        return KNOWN[key]
    for candidate in (Path(model) / "config.json", Path(model)):
        if candidate.is_file() and candidate.name == "config.json":
            return Architecture.from_config(json.loads(candidate.read_text()))
    raise ValueError(f"unknown model {model!r}: give a directory with config.json or one of {', '.join(KNOWN)}")


@dataclass(frozen=True)
class Hardware:
    devices: int
    memory_gb: float
    cpu: bool

    @classmethod
    def parse(cls, text: str) -> "Hardware":
        m = re.fullmatch(r"\s*cpu:(\d+(?:\.\d+)?)\s*gb\s*", text, re.I)
        if m:
            return cls(1, float(m.group(1)), True)
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+(?:\.\d+)?)\s*gb\s*", text, re.I)
        if m:
            return cls(int(m.group(1)), float(m.group(2)), False)
        raise ValueError(f"hardware {text!r}: expected e.g. 1x24GB, 2x80GB or cpu:32GB")

    def __str__(self) -> str:
        return f"cpu:{self.memory_gb:g}GB" if self.cpu else f"{self.devices}x{self.memory_gb:g}GB"


# Bytes kept for backward per token, per layer, per (hidden + intermediate) unit, by the precision
# training computes in and by method, fitted with `slmtune plan --measure` on SmolLM2-135M at
# seq_len 512 x micro_batch 4 (sdpa, rows of random tokens, half of them targets) and checked at
# 1024 x 2 (docs/methods.md). Adapter layers keep their own input copies, so methods differ: full
# fine-tuning keeps least (no adapter path), DoRA most (its weight-norm path), and bitsandbytes'
# CPU 4-bit matmuls keep dequantized tensors for backward.
# bf16: 2026-11-30 on a CPU with AVX512-BF16, then with an fp32 base; the base is now bf16 (counted
# in `weights`), whose smaller residual stream those constants do not credit (~10% conservative).
# fp32: 2026-12-04 on an AMD EPYC without AVX512 (train.precision auto computes in fp32 there).
# With checkpointing only each layer's input survives (4 bytes per hidden unit) plus one layer.
ACTIVATION_BYTES = {
    "bf16": {"full": 14.98, "lora": 20.8, "qlora": 27.25, "dora": 37.23},
    "fp32": {"full": 19.67, "lora": 30.51, "qlora": 34.52, "dora": 54.5},
}
RUNTIME_OVERHEAD_GB = {True: 0.6, False: 1.0}  # interpreter + torch (+ CUDA context on GPUs)


@dataclass
class Estimate:
    method: str
    strategy: str
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


def estimate(arch: Architecture, method: str, *, seq_len: int, micro_batch: int, lora_r: int = 16,
             gradient_checkpointing: bool = False, strategy: str = "none", devices: int = 1,
             cpu: bool = True, bf16: bool = True, target_fraction: float = 0.5) -> Estimate:
    """Peak bytes per device for one method and data-parallel strategy. `bf16`: training computes
    in bf16 (autocast; GPUs, and CPUs with native bf16), and adapter methods then keep their frozen
    base in bf16 as `slmtune train` does by default (model.frozen_dtype auto)."""
    total = arch.total_params()
    embed = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    linear = total - embed
    if method == "full":
        trainable = total
    elif method == "dora":
        trainable = arch.lora_params(lora_r) + arch.num_hidden_layers * (
            2 * arch.hidden_size + 2 * arch.num_key_value_heads * arch.head_dim + 3 * arch.hidden_size)
    elif method in ("lora", "qlora"):
        trainable = arch.lora_params(lora_r)
    else:
        raise ValueError(f"no estimate for method {method!r}")
    if method == "qlora":
        # NF4 with double quantization: ~4.13 bits per linear weight; embeddings and head stay fp32.
        weights = linear * 4.13 / 8 + embed * 4 + trainable * 4
    elif method == "full" or bf16_base_impossible(strategy):
        weights = total * 4 + (trainable * 4 if method != "full" else 0)
    else:
        weights = total * (2 if bf16 else 4) + trainable * 4
    gradients = trainable * 4
    optimizer = trainable * 8

    tokens = seq_len * micro_batch
    # bitsandbytes' CUDA kernels dequantize 4-bit weights again in backward instead of keeping them:
    # on GPUs QLoRA's activations are taken as LoRA's (not measured on a GPU here).
    fitted = ACTIVATION_BYTES["bf16" if bf16 else "fp32"]["lora" if method == "qlora" and not cpu else method]
    per_token_layer = fitted * (arch.hidden_size + arch.intermediate_size)
    if gradient_checkpointing:
        activations = tokens * (arch.num_hidden_layers * 4 * arch.hidden_size + per_token_layer)
    else:
        activations = tokens * arch.num_hidden_layers * per_token_layer
    # bf16 logits, their fp32 copy and its gradient, at target positions only
    activations += tokens * target_fraction * arch.vocab_size * 10

    shard = devices if strategy in ("zero3", "fsdp") else 1
    if strategy in ("zero1", "zero2", "zero3", "fsdp"):
        optimizer /= devices
    if strategy in ("zero2", "zero3", "fsdp"):
        gradients /= devices
    weights /= shard
    return Estimate(method, strategy, trainable, weights, gradients, optimizer, activations,
                    RUNTIME_OVERHEAD_GB[cpu] * GB)


def computes_in_bf16(hw: Hardware, precision: str = "auto") -> bool:
    """Whether training on `hw` computes in bf16 with train.precision `precision`; for auto, GPUs
    are assumed to have bf16 (Ampere or newer) and for a CPU this machine's is asked (AVX512-BF16 or AMX)."""
    if precision != "auto":
        return precision == "bf16"
    if not hw.cpu:
        return True
    return has_native_bf16("cpu")


def bf16_base_impossible(strategy: str) -> bool:
    """Sharded strategies flatten parameters of one dtype: the frozen base stays fp32 there."""
    return strategy in ("zero1", "zero2", "zero3", "fsdp")


REASONS = {
    "qlora": "least memory: the frozen base is stored in 4 bits",
    "lora": "lowest cost: few trainable parameters and a full-precision base, fast steps",
    "dora": "closest to full fine-tuning quality at low rank, for ~1.3-2x LoRA's step time",
    "full": "every weight adapts: the most capacity, when memory allows",
}


def recommend(estimates: list[Estimate], budget_bytes: float) -> tuple[Estimate | None, str]:
    """The scenario table as a rule: full fine-tuning when it fits comfortably, else DoRA/LoRA when
    they fit, QLoRA when only it fits; with several devices, shard (FSDP) before giving up quality."""
    fits = {(e.method, e.strategy): e for e in estimates if e.total <= budget_bytes}
    for method, strategy, why in (
        ("full", "none", REASONS["full"]),
        ("full", "fsdp", "full fine-tuning fits once FSDP/ZeRO-3 pools the devices' memory"),
        ("lora", "none", REASONS["lora"]),
        ("qlora", "none", REASONS["qlora"]),
    ):
        e = fits.get((method, strategy))
        if e is not None and (method != "full" or e.total <= 0.7 * budget_bytes):
            return e, why
    return None, "nothing fits: lower --seq-len or --micro-batch, enable gradient checkpointing, or add devices"


def plan_table(model: str, hardware: str, seq_len: int, micro_batch: int, lora_r: int = 16,
               gradient_checkpointing: bool = False,
               precision: str = "auto") -> tuple[list[Estimate], Estimate | None, str, Hardware]:
    arch = architecture(model)
    hw = Hardware.parse(hardware)
    strategies = ["none"] if hw.devices == 1 else ["none", "ddp", "zero2", "fsdp"]
    rows = [estimate(arch, m, seq_len=seq_len, micro_batch=micro_batch, lora_r=lora_r,
                     gradient_checkpointing=gradient_checkpointing, strategy=s, devices=hw.devices, cpu=hw.cpu,
                     bf16=computes_in_bf16(hw, precision))
            for s in strategies for m in ("full", "dora", "lora", "qlora")]
    best, why = recommend(rows, hw.memory_gb * GB)
    return rows, best, why, hw


def format_plan(model: str, rows: list[Estimate], best: Estimate | None, why: str, hw: Hardware) -> str:
    arch = architecture(model)
    lines = [f"{model}: {arch.total_params() / 1e6:,.0f}M parameters; hardware {hw} "
             f"({hw.memory_gb:g} GB per device)",
             f"{'method':8} {'strategy':8} {'trainable':>12} {'weights':>8} {'grads':>7} {'optim':>7} "
             f"{'activ.':>7} {'total GB':>8}  fits"]
    budget = hw.memory_gb * GB
    for e in rows:
        lines.append(f"{e.method:8} {e.strategy:8} {e.trainable:>12,} {e.weights / GB:8.2f} {e.gradients / GB:7.2f} "
                     f"{e.optimizer / GB:7.2f} {e.activations / GB:7.2f} {e.total / GB:8.2f}  "
                     f"{'yes' if e.total <= budget else 'no'}")
    if best is not None:
        lines.append(f"Recommended: {best.method}" + (f" with {best.strategy}" if best.strategy != "none" else "")
                     + f" — {why}.")
    else:
        lines.append(f"Recommended: {why}.")
    return "\n".join(lines)


def measure_one(model: str, method: str, seq_len: int, micro_batch: int, steps: int = 3, lora_r: int = 16,
                gradient_checkpointing: bool = False, precision: str = "auto") -> float:
    """Train `steps` real steps on random tokens in this process; returns peak RSS in bytes.
    `precision` as train.precision (bf16 autocast works on any CPU, emulated and slow without
    native bf16, with the memory it has where it is native)."""
    import torch

    from slmtune.data.batching import collate
    from slmtune.data.tokenize import Example
    from slmtune.methods import METHODS
    from slmtune.models import load_model
    from slmtune.training.loop import accumulate_gradients, peak_rss_mb
    from slmtune.training.loss import autocast_dtype
    from slmtune.training.run import frozen_base_dtype

    module = METHODS[method]
    cfg = module.Config(name=method, **({"lora_r": lora_r, "lora_alpha": 2 * lora_r} if method != "full" else {}))
    kwargs = module.load_kwargs(cfg)
    amp = autocast_dtype(precision, torch.device("cpu"))
    # Loaded as `slmtune train` loads it by default (model.frozen_dtype auto: a bf16 frozen base
    # for adapter methods when training computes in bf16).
    net = load_model(model, attn_implementation="sdpa", dtype=frozen_base_dtype(module, cfg, quantized=bool(kwargs),
                                                                               bf16=amp is not None), **kwargs)
    if gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = module.prepare(net, cfg)
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    vocab = net.config.vocab_size
    rows = []
    for _ in range(micro_batch):
        ids = torch.randint(10, vocab, (seq_len,), generator=generator).tolist()
        # Half the positions are targets, like a chat example with a prompt and an answer.
        targets = [-100] * (seq_len // 2) + ids[seq_len // 2 + 1:] + [-100]
        rows.append([Example(ids, targets)])
    batch = collate(rows, 0, packed=False)
    for _ in range(steps):
        accumulate_gradients(net, [batch], amp)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return peak_rss_mb() * 1024 * 1024


def measure(model: str, methods: list[str], seq_len: int, micro_batch: int, **kw) -> dict[str, float]:
    """Peak RSS of a few real steps per method, each in a fresh process (peak RSS never goes down)."""
    import subprocess
    import sys

    results = {}
    for method in methods:
        code = ("import sys, json; from slmtune.training.plan import measure_one; "
                f"print(json.dumps(measure_one({model!r}, {method!r}, {seq_len}, {micro_batch}, **{kw!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {method} failed:\n{proc.stderr[-2000:]}")
        results[method] = float(proc.stdout.strip().splitlines()[-1])
    return results


@dataclass
class TimeEstimate:
    examples: int
    held_out: int
    epochs: float
    tokens_per_epoch: int
    probe_steps: int
    tokens_per_second: float
    threads: int

    @property
    def train_seconds(self) -> float:
        return self.epochs * self.tokens_per_epoch / self.tokens_per_second

    def describe(self) -> str:
        minutes = self.train_seconds / 60
        return (f"{self.examples} training examples ({self.held_out} held out for validation), {self.epochs:g} "
                f"epoch(s) of {self.tokens_per_epoch:,} tokens; {self.tokens_per_second:.0f} tokens/s measured over "
                f"{self.probe_steps} real steps here ({self.threads} threads): about "
                f"{minutes:.1f} minutes of training, plus loading and evaluations")


def estimate_time(recipe_path: str, overrides: list[str] | None = None, probe_steps: int = 3) -> TimeEstimate:
    """How long a recipe trains on this machine: its data tokenized as the run will (epochs "auto"
    resolved the same way), and the tokens/s of `probe_steps` real steps of that very recipe in a
    child process (`slmtune train ... train.max_steps=N`), since a CPU's speed is best measured, not
    modelled. A `train.time_budget` is its own answer."""
    import subprocess
    import sys
    import tempfile

    from slmtune.config import load_recipe
    from slmtune.data.dataset import build_datasets
    from slmtune.models import load_tokenizer
    from slmtune.training.objectives import OBJECTIVES

    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(recipe.model.name)
    pairs = OBJECTIVES[recipe.train.objective.name].formats == ("preference",)
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed, pairs=pairs)
    cfg = recipe.train.resolved_for_data(data.n_examples, recipe.method.name, data.n_target_tokens,
                                         data.held_out)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "slmtune.cli", "train", str(recipe_path), *(overrides or []),
               f"output.dir={tmp}/probe", "output.overwrite=true", f"train.max_steps={probe_steps}",
               "train.eval_every=0", "train.save_every=0", "train.time_budget=null", "--no-progress"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the probe run failed:\n{proc.stderr[-2000:]}")
        summary = json.loads((Path(tmp) / "probe" / "summary.json").read_text())
    return TimeEstimate(examples=len(data.train), held_out=data.held_out, epochs=float(cfg.epochs),
                        tokens_per_epoch=sum(len(e) for e in data.train), probe_steps=summary["steps"],
                        tokens_per_second=summary["tokens_per_second"], threads=summary["threads"])
