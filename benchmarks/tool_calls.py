"""Forced tool calls (tool_choice "required" / a named function): what constrained decoding costs.

    python benchmarks/tool_calls.py --threads 2 --repeats 3 [--model smollm2-135m-instruct] [--adapter runs/tools-lora]

On the examples/tools test requests that expect a call, with the examples' three tools offered,
greedy decoding of one request at a time through the one generation path (slmtune.generation):
  free     the answer as the model writes it (tool_choice "auto")
  forced   a GrammarConstraint (llguidance) on the row: one call block whose JSON fits the function's
           schema (tool_choice "required")
Printed per mode: tokens/s (prefill included; runs alternate, each mode's best of --repeats kept),
the mean time of one mask (llguidance's mask for the SmolLM2 vocabulary, unpacked and applied to the
logits), the share of answers that parse as a call, and the share whose call is exactly right.
Also the one-time cost of building llguidance's tokenizer and of compiling one grammar.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS_TEST = REPO / "examples" / "tools" / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default=None, help="a run directory (e.g. runs/tools-lora): its model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import platform

    import torch

    from slmtune.data.tools import call_grammar, parse_calls, tool_style
    from slmtune.generation import (Completion, Decoding, GrammarConstraint, SamplingParams, TorchDecoder,
                                    chat_prompt_ids, detokenizer, llguidance_tokenizer, pad_id_of)
    from slmtune.models import end_of_turn_ids
    from slmtune.tasks.tools import reference, same_calls
    from slmtune.training.rundir import load_for_inference

    torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.adapter or args.model)
    eos = end_of_turn_ids(model, tokenizer)
    style = tool_style(tokenizer)
    decoder, decode = TorchDecoder(model, pad_id_of(tokenizer, eos)), detokenizer(tokenizer)
    rows = [json.loads(line) for line in TOOLS_TEST.read_text().splitlines()]
    rows = [r for r in rows if r["messages"][-1].get("tool_calls")][: args.requests]
    prompts = [chat_prompt_ids(tokenizer, r["messages"][:-1], r["tools"]) for r in rows]

    start = time.perf_counter()
    llguidance_tokenizer(tokenizer, tuple(sorted(eos)))
    tokenizer_seconds = time.perf_counter() - start
    start = time.perf_counter()
    GrammarConstraint(call_grammar(rows[0]["tools"], style), tokenizer, eos)
    grammar_seconds = time.perf_counter() - start

    class Timed(GrammarConstraint):
        masks = 0
        seconds = 0.0

        def mask(self, logits):
            began = time.perf_counter()
            super().mask(logits)
            Timed.seconds += time.perf_counter() - began
            Timed.masks += 1

    def run(mode: str) -> tuple[float, list[str]]:
        tokens, seconds, texts = 0, 0.0, []
        for row, prompt in zip(rows, prompts):
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
            began = time.perf_counter()
            # The grammar is compiled per request, as the server does: its cost is part of "forced".
            constraint = Timed(call_grammar(row["tools"], style), tokenizer, eos) if mode == "forced" else None
            reply = Completion(prompt, params, args.max_tokens, constraint=constraint)
            decoder.decode([Decoding(reply, decode, eos)])
            seconds += time.perf_counter() - began
            tokens += reply.completion_tokens
            texts.append(reply.text)
        return tokens / seconds, texts

    best: dict[str, float] = {}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for mode in ("free", "forced"):  # alternating: the machine's drift hits both alike
            speed, texts = run(mode)
            best[mode] = max(best.get(mode, 0.0), speed)
            answers[mode] = texts
    names = {t["function"]["name"] for t in rows[0]["tools"]}
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, {args.model}"
          f"{' + ' + args.adapter if args.adapter else ''}, {len(rows)} requests, tool style {style}")
    print(f"llguidance tokenizer: {tokenizer_seconds:.2f} s once per tokenizer; one grammar: {grammar_seconds * 1000:.1f} ms")
    print(f"{'mode':<8} {'tok/s':>7} {'x free':>7} {'mask us':>8} {'calls parse':>12} {'calls exact':>12}")
    for mode in ("free", "forced"):
        parsed = [parse_calls(t, style, names)[1] for t in answers[mode]]
        exact = [same_calls([{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                             for c in calls], reference(r)) for calls, r in zip(parsed, rows)]
        mask = f"{Timed.seconds / Timed.masks * 1e6:.0f}" if mode == "forced" and Timed.masks else "-"
        print(f"{mode:<8} {best[mode]:>7.1f} {best[mode] / best['free']:>7.2f} {mask:>8} "
              f"{sum(map(bool, parsed)) / len(rows):>12.2f} {sum(exact) / len(rows):>12.2f}")


if __name__ == "__main__":
    main()
