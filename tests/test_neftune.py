"""NEFTune (train.neftune_alpha): noise of the paper's scale on the input embeddings in training mode
only, gone after the block, and a run that uses it differs from one that does not while alpha 0
changes nothing."""

import math

import pytest
import torch

from slmtune.config import RecipeError, recipe_from_dict
from slmtune.models import load_model
from slmtune.training.neftune import embedding_noise_scale, noisy_embeddings
from slmtune.training import events
from slmtune.training.rundir import RunDir
from slmtune.training.run import run
from tests.test_train import make_recipe


@torch.no_grad()
def test_noise_is_uniform_at_the_papers_scale_in_training_mode_only(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir))
    embeddings = model.get_input_embeddings()
    ids = torch.randint(0, embeddings.num_embeddings, (2, 48))
    clean = embeddings(ids)
    alpha = 5.0
    scale = embedding_noise_scale(alpha, 48, clean.size(-1))
    assert scale == pytest.approx(alpha / math.sqrt(48 * clean.size(-1)))
    with noisy_embeddings(model, alpha):
        model.train()
        noise = embeddings(ids) - clean
        model.eval()
        assert torch.equal(embeddings(ids), clean)  # evaluation and generation see clean embeddings
    assert noise.abs().max() <= scale
    assert noise.abs().max() > 0.9 * scale  # U(-s, s) over ~6k entries reaches near its edge
    assert noise.mean().abs() < 0.05 * scale and noise.std() == pytest.approx(scale / math.sqrt(3), rel=0.05)
    model.train()
    assert torch.equal(embeddings(ids), clean)  # the hook is removed after the block


def losses(run_dir) -> list[float]:
    return [e.loss for e in RunDir(run_dir).metrics() if isinstance(e, events.Step)]


def test_a_run_with_noise_trains_differently_and_alpha_zero_is_no_noise(tiny_llama_dir, chat_file, tmp_path):
    runs = {}
    for name, alpha in (("none", None), ("zero", 0.0), ("noisy", 5.0)):
        recipe = make_recipe(tiny_llama_dir, chat_file, tmp_path / name, max_steps=4, neftune_alpha=alpha)
        runs[name] = losses(run(recipe, progress=False).run_dir)
    assert runs["zero"] == runs["none"]
    assert runs["noisy"][0] != runs["none"][0]  # the first step already sees noisy embeddings
    assert all(math.isfinite(x) for x in runs["noisy"])
    saved = (tmp_path / "noisy" / "recipe.yaml").read_text()
    assert "neftune_alpha: 5.0" in saved


def test_noise_is_refused_for_objectives_other_than_sft(tiny_llama_dir):
    with pytest.raises(RecipeError, match="neftune_alpha applies to the sft objective, not dpo"):
        recipe_from_dict({"model": {"name": str(tiny_llama_dir)}, "method": {"name": "lora"},
                          "data": {"train": "pairs.jsonl"}, "train": {"objective": "dpo", "neftune_alpha": 5}})
