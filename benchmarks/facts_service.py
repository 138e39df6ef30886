"""Facts taught through the service, one job per cell, side by side: examples/product_facts (25 facts x
3 conversations) uploaded to a fresh `slmtune api` on SmolLM2-135M-Instruct, a supervised job with
the cell's hyperparameters (the rest "auto"; seed 42 unless the cell sets one), then the 25 paraphrased held-out questions
answered greedily through chat completions, scored as the acceptance test scores them
(tests/service/test_facts_service.py).

    python benchmarks/facts_service.py '{}' '{"batch_size": 2}'     # the rule, then batch 2
    python benchmarks/facts_service.py --repeats 2 '{}' '{"batch_size": 4}'
    python benchmarks/facts_service.py '{}' '{"settings": {"train_precision": "fp32", "serve_dtype": "float32"}}'
    python benchmarks/facts_service.py '{"seed": 1}' '{"seed": 1, "settings": {"train_precision": "fp32"}}'

A cell's "settings" are the service's (slmtune/service/settings.py) for that cell, its "seed" the
job's seed (42 unless given: the held-out split, the adapter's initialization and the order), its
"train" and "method" recipe keys the API does not expose, merged into the job's recipe (an experiment
of what "auto" could set, e.g. '{"train": {"neftune_alpha": 5}}' or '{"method": {"lora_r": 64,
"lora_alpha": 128}}'); the rest are the job's hyperparameters.

Cells run one after another and alternate when repeated (machine speed drifts); prints a table.
Needs `slmtune models pull smollm2-135m-instruct`. It reuses the test suite's service harness
(tests/service/conftest.py: a real server and worker in this process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the tests package: the service harness and the facts score

from slmtune.service import hyper  # noqa: E402
from tests.service.conftest import smollm2_job  # noqa: E402
from tests.service.test_facts_service import facts_right  # noqa: E402

EXAMPLES = REPO / "examples" / "product_facts"


RECIPE_SECTIONS = ("train", "method")  # the recipe sections a cell may update


def with_recipe_keys(build_recipe, sections: dict):
    """hyper.build_recipe, its recipe's sections updated with `sections` ({"train": {...}, ...}),
    validated as a recipe file's keys are (a misspelt key is an error, not a silent no-op)."""
    def build(**kwargs):
        recipe = build_recipe(**kwargs)
        data = recipe.model_dump()
        for name, keys in sections.items():
            data[name] = {**data[name], **keys}
        return type(recipe).model_validate(data)
    return build


def cell(requested: dict, home: Path) -> dict:
    hyperparameters = {k: v for k, v in requested.items() if k not in ("settings", "seed", *RECIPE_SECTIONS)}
    system = json.loads((EXAMPLES / "train.jsonl").open().readline())["messages"][0]["content"]
    questions = [json.loads(line) for line in (EXAMPLES / "heldout.jsonl").read_text().splitlines()]
    create = {"method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}
    patch = pytest.MonkeyPatch()
    sections = {name: requested[name] for name in RECIPE_SECTIONS if requested.get(name)}
    if sections:
        patch.setattr(hyper, "build_recipe", with_recipe_keys(hyper.build_recipe, sections))
    started = time.time()
    try:
        with smollm2_job(home, patch, "facts", EXAMPLES / "train.jsonl", timeout=7200,
                         settings=requested.get("settings"),
                         **({"seed": requested["seed"]} if "seed" in requested else {}),  # else the harness's 42
                         **create) as (client, job):
            if job.status != "succeeded":
                raise SystemExit(f"job {job.id} {job.status}: {job.error}")
            right = facts_right(client, job.fine_tuned_model, system, questions)
            hp = job.hyperparameters
            return {"requested": json.dumps(requested), "n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
                    "lr_multiplier": hp.learning_rate_multiplier, "right": right, "of": len(questions),
                    "seconds": round(time.time() - started)}
    finally:
        patch.undo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cells", nargs="+", help="JSON hyperparameters of each cell ('{}': all auto)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, text in enumerate(args.cells):
                rows.append(cell(json.loads(text), Path(tmp) / f"home-{repeat}-{i}") | {"repeat": repeat})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {os.cpu_count()} cores; torch threads 2 (the service's train_threads)")
    print(f"{'epochs':>6}{'batch':>6}{'lr x':>6}{'right':>8}{'seconds':>9}  requested")
    for r in rows:
        print(f"{r['n_epochs']:>6}{r['batch_size']:>6}{r['lr_multiplier']:>6g}"
              f"{r['right']:>5}/{r['of']:<2}{r['seconds']:>9}  {r['requested']}")


if __name__ == "__main__":
    main()
