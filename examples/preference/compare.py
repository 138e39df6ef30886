"""The preference results row: base vs SFT vs DPO vs ORPO on the style preference of this folder.

    python examples/preference/compare.py runs/pref-sft runs/pref-dpo runs/pref-orpo

For the base model and each run: the share of greedy answers to the 20 held-out prompts that open
with "In short:" (the trait only the preferred answers have), and the win rate / reward accuracy on
the same prompts as pairs (heldout_pairs.jsonl, slmtune.evaluate.preference_scores). The runs are
trained with e.g.
    slmtune train --model smollm2-135m-instruct --data examples/preference/train.jsonl --objective dpo --output runs/pref-dpo
(see docs/results.md for the exact commands of the published row).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slmtune.chat import generate_reply
from slmtune.data.tokenize import encode_pair
from slmtune.evaluate import preference_scores, reference_for
from slmtune.models import load_model, load_tokenizer
from slmtune.training.rundir import RunDir, load_for_inference

HERE = Path(__file__).resolve().parent
TRAIT = "In short:"


def score(model, tokenizer, reference_model=None) -> dict:
    prompts = [json.loads(line)["messages"] for line in (HERE / "heldout.jsonl").open()]
    trait = sum(generate_reply(model, tokenizer, m, max_new_tokens=12).strip().startswith(TRAIT) for m in prompts)
    pairs = [encode_pair(json.loads(line), tokenizer, None) for line in (HERE / "heldout_pairs.jsonl").open()]
    scores = preference_scores(model, tokenizer, pairs, reference_model=reference_model)
    return {"trait": trait / len(prompts), "n": len(prompts)} | scores


def main(runs: list[str]) -> None:
    base_name = RunDir(runs[0]).recipe().model.name if runs else "smollm2-135m-instruct"
    tokenizer = load_tokenizer(base_name)
    base = load_model(base_name)
    rows = [("base", score(base, tokenizer))]
    for run in runs:
        model, run_tokenizer = load_for_inference(run)
        recipe = RunDir(run).recipe()
        rows.append((f"{recipe.train.objective.name} ({run})", score(model, run_tokenizer, reference_for(model, recipe))))
    print(f"{'model':<40}{'trait share':>12}{'win rate':>10}{'reward acc':>12}")
    for name, s in rows:
        acc = f"{s['reward_accuracy']:.2f}" if "reward_accuracy" in s else "-"
        print(f"{name:<40}{s['trait']:>12.2f}{s['win_rate']:>10.2f}{acc:>12}")


if __name__ == "__main__":
    main(sys.argv[1:])
