"""ONNX quantization options against PyTorch fp32: greedy agreement, next-token agreement, speed, size.

    python benchmarks/onnx_quantization.py --threads 2 --prompts 12 --max-tokens 64

Exports SmolLM2-135M-Instruct with onnxruntime-genai's model builder in several precisions and
builder options (what `slmtune export --format onnx --precision P --builder-option K=V` runs),
then, on the first `--prompts` chat prompts of ../shared/data/chat/test.jsonl:
  agree   share of PyTorch fp32's greedy tokens the export reproduces before the first divergence
  next    next-token agreement: the export fed PyTorch's answer, its greedy choice compared at every
          position (teacher forcing: how often one step agrees, without the compounding)
  tok/s   the export's greedy generation speed, one stream, in this process (prefill included)
  MB      size of model.onnx and its weights
Run it with the machine otherwise idle; the thread count is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHAT_TEST = REPO.parent / "shared" / "data" / "chat" / "test.jsonl"

# (label, precision, builder options)
VARIANTS = [
    ("fp32", "fp32", {}),
    ("int8 (builder default)", "int8", {}),
    ("int8 block_size=16", "int8", {"block_size": "16"}),
    ("int8 asymmetric", "int8", {"is_symmetric": "false"}),
    ("int8, fp32 lm_head", "int8", {"nodes_to_exclude": "/lm_head/MatMul"}),
    ("int8 accuracy_level=2", "int8", {"accuracy_level": "2"}),
    ("int4 (builder default)", "int4", {}),
    ("int4 block_size=16", "int4", {"block_size": "16"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    torch.set_num_threads(args.threads)
    import onnxruntime_genai as og

    from slmtune.models import end_of_turn_ids, load_model, load_tokenizer, resolve
    from slmtune.export.onnx import OnnxDecoder, build_onnx, genai_eos_ids, genai_vocab_size, onnx_next_token_matches
    from slmtune.export.parity import agreement, greedy_tokens, prompt_ids
    from slmtune.generation import TorchDecoder, pad_id_of

    model_dir = resolve(args.model)
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    eos = end_of_turn_ids(model, tokenizer)
    with CHAT_TEST.open() as f:
        texts = [json.loads(next(f))["messages"][0]["content"] for _ in range(args.prompts)]
    encoded = [prompt_ids(tokenizer, t) for t in texts]
    answers = greedy_tokens(TorchDecoder(model, pad_id_of(tokenizer, eos)), tokenizer, encoded, args.max_tokens, eos)
    reference_tokens = sum(map(len, answers))
    del model

    work = Path(tempfile.mkdtemp(prefix="slmtune-onnx-quant-"))
    rows = []
    try:
        for label, precision, options in VARIANTS:
            out = work / f"export-{len(rows)}"
            (work / f"build-{len(rows)}").mkdir()
            build_onnx(model_dir, out, precision, work_dir=work / f"build-{len(rows)}", builder_options=options)
            exported = og.Model(str(out))
            stop = eos | genai_eos_ids(out)
            agreed = generated = 0
            started = time.perf_counter()
            decoder = OnnxDecoder(exported, genai_vocab_size(out, tokenizer))
            for ids, answer in zip(encoded, answers):
                [got] = greedy_tokens(decoder, tokenizer, [ids], args.max_tokens, stop)
                generated += len(got)
                agreed += agreement(answer, got)
            seconds = time.perf_counter() - started
            matches = sum(onnx_next_token_matches(exported, ids, answer) for ids, answer in zip(encoded, answers))
            size = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx")) / 1e6
            rows.append((label, agreed / reference_tokens, matches / reference_tokens, generated / seconds, size))
            print(f"{label}: done", flush=True)
            del exported
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nONNX exports of {args.model} vs PyTorch fp32 greedy, {args.prompts} chat prompts, {args.max_tokens} new "
          f"tokens at most ({reference_tokens} reference tokens), {args.threads} threads")
    print(f"{'variant':24} {'agree':>6} {'next':>6} {'tok/s':>7} {'MB':>6}")
    for label, agree, following, speed, size in rows:
        print(f"{label:24} {100 * agree:>5.1f}% {100 * following:>5.1f}% {speed:>7.1f} {size:>6.0f}")


if __name__ == "__main__":
    main()
