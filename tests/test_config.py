from pathlib import Path

import pytest

from slmtune.config import RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))

MINIMAL = """\
model:
  name: some/model
data:
  train: train.jsonl
train:
  epochs: 2
output:
  dir: runs/x
"""


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads_and_starts_with_its_command(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first == f"# slmtune train {path.relative_to(REPO)}"
    data = (REPO / recipe.data.train).resolve()
    if not data.is_file() and data.is_relative_to(REPO.parent / "shared"):
        pytest.skip(f"{recipe.data.train}: the shared datasets are not beside this checkout (../shared/data)")
    assert data.is_file(), "recipe data must exist relative to the repo root"


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path, ["train.learning_rate=1e-3", "method.lora_r=4", "data.max_length=64"])
    assert recipe.train.learning_rate == 1e-3
    assert recipe.method.name == "lora" and recipe.method.lora_r == 4
    assert recipe.method.target_modules == "all-linear"
    assert recipe.data.max_length == 64
    assert recipe.train.epochs == 2


def test_unknown_key_names_file_line_and_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.replace("  epochs: 2", "  epochs: 2\n  lerning_rate: 0.1"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:7: train.lerning_rate: unknown key" in str(err.value)


def test_bad_value_names_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.replace("epochs: 2", "epochs: -1"))
    with pytest.raises(RecipeError, match=r"r.yaml:6: train.epochs: Input should be greater than 0"):
        load_recipe(path)


def test_unknown_method_key_and_missing_section(tmp_path):
    with pytest.raises(RecipeError, match=r"method.lora_rank: unknown key"):
        recipe_from_dict({"model": "m", "method": {"name": "lora", "lora_rank": 3},
                          "data": {"train": "t"}, "output": {"dir": "o"}})
    with pytest.raises(RecipeError, match=r"output: required key is missing"):
        recipe_from_dict({"model": "m", "data": {"train": "t"}})
    with pytest.raises(RecipeError, match=r"method"):
        recipe_from_dict({"model": "m", "method": "nonsense", "data": {"train": "t"}, "output": {"dir": "o"}})


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(path)


def test_resolved_recipe_round_trips(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path)
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again) == recipe


def test_loss_chunks_need_the_fused_cross_entropy():
    base = {"model": "m", "data": {"train": "t"}, "output": {"dir": "o"}}
    with pytest.raises(RecipeError, match=r"train: .*loss_chunk_tokens sets the chunks of cross_entropy: fused"):
        recipe_from_dict({**base, "train": {"cross_entropy": "plain", "loss_chunk_tokens": 64}})
    assert recipe_from_dict({**base, "train": {"loss_chunk_tokens": 64}}).train.cross_entropy == "fused"
