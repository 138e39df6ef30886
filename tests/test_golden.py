"""Golden losses: every shipped recipe, run for a few steps on the tiny random Llama with its own
data, must give the losses pinned in tests/golden/recipe_losses.json.

A transformers / peft / torch upgrade that silently changes numerics (a new default, a changed
initialisation, another loss reduction) fails here with the recipe's name. Everything that
differs between machines is pinned: fp32, one thread, the recipe's seed. When a change of numbers
is intended, regenerate the file and say why in the commit:

    SLMTUNE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slmtune.config import load_recipe
from slmtune.training import events
from slmtune.training.rundir import RunDir
from slmtune.training.run import run

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden" / "recipe_losses.json"
STEPS = 3
UPDATE = os.environ.get("SLMTUNE_UPDATE_GOLDEN") == "1"
# The tiny tokenizer spends about a token per character: the tool specs alone pass 512 tokens.
MAX_LENGTH = {"tools/lora.yaml": 2048}
SAMPLING_METRICS = ("completion_length",)


def recipe_id(path: Path) -> str:
    return str(path.relative_to(REPO / "recipes"))


@pytest.fixture(scope="module")
def golden() -> dict:
    values = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    yield values
    if UPDATE:
        GOLDEN.write_text(json.dumps(dict(sorted(values.items())), indent=2) + "\n")


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_first_losses_of_every_recipe_are_pinned(path, golden, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository root
    recipe = load_recipe(path, [
        f"model.name={tiny_llama_dir}", f"output.dir={tmp_path / 'run'}", "output.overwrite=true",
        f"train.max_steps={STEPS}", "train.precision=fp32", "train.num_threads=1", "train.eval_every=0",
        "train.save_every=0", "data.max_examples=16", f"data.max_length={MAX_LENGTH.get(recipe_id(path), 512)}",
        "data.validation=null"])
    if not Path(recipe.data.train).is_file():
        pytest.skip(f"{recipe.data.train}: the shared datasets are not beside this checkout")
    result = run(recipe, progress=False)
    steps = [e for e in RunDir(result.run_dir).metrics() if isinstance(e, events.Step)]
    assert len(steps) == STEPS
    # GRPO's loss on a random model is 0 (no answer earns a reward): its sampled answers' lengths
    # pin the sampling numerics instead.
    losses = [e.loss for e in steps] + [e.metrics[k] for e in steps for k in SAMPLING_METRICS if k in e.metrics]
    name = recipe_id(path)
    if UPDATE:
        golden[name] = losses
        return
    assert name in golden, f"no golden losses for {name}; run with SLMTUNE_UPDATE_GOLDEN=1 and commit the file"
    assert losses == pytest.approx(golden[name], rel=1e-4), name


def test_every_golden_entry_has_its_recipe():
    if UPDATE:
        pytest.skip("regenerating")
    assert set(json.loads(GOLDEN.read_text())) == {recipe_id(p) for p in RECIPES}
