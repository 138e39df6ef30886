"""GGUF exports (`slmtune export --format gguf --quant Q`) against PyTorch fp32: agreement, speed, size.

    python benchmarks/gguf_export.py --threads 2 --prompts 12 --max-tokens 64

Writes SmolLM2-135M-Instruct as GGUF at each --quant the `gguf` package produces, then, on the first
`--prompts` chat prompts of ../shared/data/chat/test.jsonl, for two readers of the same file:
  llama.cpp      llama-cpp-python (needs `pip install -e ".[gguf]"`), what llama.cpp/Ollama users run
  transformers   transformers' GGUF loader: weights dequantized to fp32, run in PyTorch
  agree   share of PyTorch fp32's greedy tokens reproduced before the first divergence
  next    next-token agreement: fed PyTorch's answer, the export's greedy choice at every position
  tok/s   llama.cpp's greedy generation speed, one stream, prefill included, `--threads` threads;
          x = that speed over PyTorch fp32's, measured the same way in the same run (printed first)
  MB      the .gguf file; s = seconds to write it
These agreements set slmtune.export.gguf.MIN_NEXT_TOKEN_AGREEMENT (docs/export.md).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quants", default="f32,f16,bf16,q8_0,q5_0,q4_1,q4_0")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from slmtune.export.gguf import GGUF_FILE, LlamaCppCandidate, write_gguf
    from slmtune.export.parity import agreement, greedy_tokens, prompt_ids, torch_next_token_matches
    from slmtune.generation import TorchDecoder, pad_id_of
    from slmtune.models import end_of_turn_ids, load_model, load_tokenizer, resolve

    model_dir = resolve(args.model)
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir).float().eval()
    eos = end_of_turn_ids(model, tokenizer)
    with CHAT_TEST.open() as f:
        texts = [json.loads(next(f))["messages"][0]["content"] for _ in range(args.prompts)]
    encoded = [prompt_ids(tokenizer, t) for t in texts]
    answers = greedy_tokens(TorchDecoder(model, pad_id_of(tokenizer, eos)), tokenizer, encoded, args.max_tokens, eos)
    reference_tokens = sum(map(len, answers))
    # PyTorch's own single-stream speed, measured the same way as each export's, for the ratio.
    torch_decoder = TorchDecoder(model, pad_id_of(tokenizer, eos))
    started = time.perf_counter()
    generated = sum(len(greedy_tokens(torch_decoder, tokenizer, [ids], args.max_tokens, eos)[0]) for ids in encoded)
    torch_speed = generated / (time.perf_counter() - started)

    def agreements(decoder, next_token_matches, stop):
        agreed = generated = 0
        started = time.perf_counter()
        for ids, answer in zip(encoded, answers):
            [got] = greedy_tokens(decoder, tokenizer, [ids], args.max_tokens, stop)
            generated += len(got)
            agreed += agreement(answer, got)
        speed = generated / (time.perf_counter() - started)
        matches = sum(next_token_matches(ids, answer) for ids, answer in zip(encoded, answers))
        return agreed / reference_tokens, matches / reference_tokens, speed

    work = Path(tempfile.mkdtemp(prefix="slmtune-gguf-bench-"))
    rows = []
    try:
        for quant in args.quants.split(","):
            folder = work / quant
            folder.mkdir()
            started = time.perf_counter()
            path = write_gguf(model, tokenizer, folder / GGUF_FILE, quant)
            write_seconds = time.perf_counter() - started
            cpp = LlamaCppCandidate(path, n_threads=args.threads)
            cpp_agree, cpp_next, cpp_speed = agreements(cpp.decoder, cpp.next_token_matches, eos | cpp.extra_eos_ids)
            cpp.close()
            back = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
            hf_agree, hf_next, _ = agreements(TorchDecoder(back, pad_id_of(tokenizer, eos)),
                                              lambda ids, answer: torch_next_token_matches(back, ids, answer), eos)
            rows.append((quant, cpp_agree, cpp_next, cpp_speed, hf_agree, hf_next, path.stat().st_size / 1e6,
                         write_seconds))
            print(f"{quant}: done", flush=True)
            del back
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nGGUF exports of {args.model} vs PyTorch fp32 greedy, {args.prompts} chat prompts, {args.max_tokens} new "
          f"tokens at most ({reference_tokens} reference tokens), {args.threads} threads")
    print(f"PyTorch fp32 (transformers, slmtune's decoder), one stream: {torch_speed:.1f} tok/s")
    print(f"{'quant':6} | {'llama.cpp agree':>15} {'next':>6} {'tok/s':>6} {'x':>5} | {'transformers agree':>18} "
          f"{'next':>6} | {'MB':>5} {'s':>5}")
    for quant, ca, cn, speed, ha, hn, size, seconds in rows:
        print(f"{quant:6} | {100 * ca:>14.1f}% {100 * cn:>5.1f}% {speed:>6.1f} {speed / torch_speed:>4.1f}x | "
              f"{100 * ha:>17.1f}% {100 * hn:>5.1f}% | {size:>5.0f} {seconds:>5.1f}")


if __name__ == "__main__":
    main()
