"""The parity check every export reports: the exported model against the run as PyTorch loads it.

    report = parity(run_dir, export_dir, candidate, "onnx")      # also written to EXPORT_DIR/parity.json
    print(format_parity(report))

Both sides answer the same fixed prompts greedily through the one generation path
(slmtune/generation.py), each with its own Decoder (PyTorch, ONNX Runtime GenAI, ...). Two numbers:
- token agreement: the share of generated tokens that match before the first divergence (summed
  over prompts, each side's answer ending at end of turn or after `max_new_tokens`). One flipped
  near-tie changes everything after it, so this compounds with the answer's length.
- next-token agreement: the exported model is fed PyTorch's answer and its greedy choice is
  compared at every position (teacher forcing): how often one step picks the same token, without
  the compounding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch

from slmtune import atomic
from slmtune.generation import GREEDY, Decoder, SamplingParams, TorchDecoder, chat_prompt_ids, complete_with, pad_id_of
from slmtune.models import end_of_turn_ids
from slmtune.training.rundir import load_for_inference

PARITY_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How do I reset my device?",
    "List three colors.",
]
PARITY_MAX_NEW_TOKENS = 24


class Candidate(Protocol):
    """An exported model as parity sees it: a Decoder, and teacher-forced next-token matches."""

    decoder: Decoder
    extra_eos_ids: set[int]  # end-of-turn ids the export declares beyond the tokenizer's

    def next_token_matches(self, prompt_ids: list[int], reference: list[int]) -> int:
        """Positions where the candidate's greedy choice, fed `reference` so far, is the reference token."""


class TorchCandidate:
    """A PyTorch model (e.g. the merged export loaded back) as a parity candidate."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.decoder = TorchDecoder(model, pad_id_of(tokenizer, end_of_turn_ids(model, tokenizer)))
        self.extra_eos_ids: set[int] = set()

    def next_token_matches(self, prompt_ids: list[int], reference: list[int]) -> int:
        return torch_next_token_matches(self.model, prompt_ids, reference)


def torch_next_token_matches(model, prompt_ids: list[int], reference: list[int]) -> int:
    """The teacher-forced count for a PyTorch model: one forward pass over prompt + reference."""
    if not reference:
        return 0
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + reference[:-1]])).logits[0, len(prompt_ids) - 1:]
    return int((logits.argmax(-1) == torch.tensor(reference)).sum())


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A one-turn user prompt ready for the assistant's answer."""
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


def greedy_tokens(decoder: Decoder, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                  eos_ids: set[int]) -> list[list[int]]:
    """Greedy answers as token ids, the end-of-turn token included when reached."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=GREEDY.temperature)
    return [c.token_ids for c in complete_with(decoder, tokenizer, prompts, params, eos_ids=eos_ids, batch_size=1)]


def agreement(reference: list[int], exported: list[int]) -> int:
    """Tokens that match before the first divergence."""
    n = 0
    for a, b in zip(reference, exported):
        if a != b:
            break
        n += 1
    return n


def parity(run_dir: str | os.PathLike, export_dir: str | os.PathLike, candidate: Candidate, fmt: str, *,
           prompts: list[str] | None = None, max_new_tokens: int = PARITY_MAX_NEW_TOKENS, reference=None) -> dict:
    """Greedy answers of `candidate` against the PyTorch model; also written to EXPORT_DIR/parity.json.

    `reference` is an already loaded (model, tokenizer) pair; by default the run is loaded as
    `slmtune chat` loads it."""
    export_dir = Path(export_dir)
    prompts = list(prompts or PARITY_PROMPTS)
    model, tokenizer = reference or load_for_inference(run_dir)
    eos_ids = end_of_turn_ids(model, tokenizer) | candidate.extra_eos_ids
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    wanted = greedy_tokens(TorchDecoder(model, pad_id_of(tokenizer, eos_ids)), tokenizer, encoded, max_new_tokens,
                           eos_ids)
    got = greedy_tokens(candidate.decoder, tokenizer, encoded, max_new_tokens, eos_ids)
    rows = []
    for prompt, ids, want, answer in zip(prompts, encoded, wanted, got):
        agreed = agreement(want, answer)
        rows.append({
            "prompt": prompt, "agreed_tokens": agreed, "compared_tokens": max(len(want), len(answer)),
            "next_token_matches": candidate.next_token_matches(ids, want), "reference_tokens": len(want),
            "first_divergence": None if want == answer else agreed,
            "pytorch": tokenizer.decode(want, skip_special_tokens=True),
            "exported": tokenizer.decode(answer, skip_special_tokens=True),
            "pytorch_tokens": want, "exported_tokens": answer,
        })
    agreed = sum(r["agreed_tokens"] for r in rows)
    compared = sum(r["compared_tokens"] for r in rows)
    matches, reference_tokens = sum(r["next_token_matches"] for r in rows), sum(r["reference_tokens"] for r in rows)
    report = {
        "format": fmt,
        "agreed_tokens": agreed,
        "compared_tokens": compared,
        "token_agreement": agreed / compared if compared else 1.0,
        "next_token_agreement": matches / reference_tokens if reference_tokens else 1.0,
        "identical_answers": sum(r["first_divergence"] is None for r in rows),
        "prompts": len(rows),
        "max_new_tokens": max_new_tokens,
        "measure": "token_agreement: greedy tokens matching the PyTorch model's before the first divergence; "
                   "next_token_agreement: the export's greedy choice fed PyTorch's answer (teacher forcing)",
        "examples": rows,
    }
    atomic.write_text(export_dir / "parity.json", json.dumps(report, indent=2) + "\n")
    return report


def format_parity(report: dict) -> str:
    return (f"parity ({report['format']} vs PyTorch, greedy): {report['agreed_tokens']}/{report['compared_tokens']} "
            f"tokens agree before the first divergence ({100 * report['token_agreement']:.1f}%), next-token "
            f"agreement {100 * report['next_token_agreement']:.1f}% (fed PyTorch's answer), "
            f"{report['identical_answers']}/{report['prompts']} answers identical")
