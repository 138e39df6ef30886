"""NEFTune (train.neftune_alpha): noise of the paper's scale on the input embeddings in training mode
only, gone after the block, and a run that uses it differs from one that does not while alpha 0
changes nothing."""

import math

import pytest
import torch

from slmtune.config import RecipeError, recipe_from_dict
from slmtune.models import load_model
from slmtune.data.batching import collate
from slmtune.data.tokenize import Example
from slmtune.training.neftune import embedding_noise_scale, example_lengths, noisy_embeddings
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


def test_example_lengths_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
    assert example_lengths(positions).tolist() == [[3, 3, 3, 2, 2, 1, 1], [7] * 7]


@torch.no_grad()
def test_each_example_gets_its_own_scale_packed_or_padded(tiny_llama_dir):
    """Two examples of 10 and 30 tokens packed into one row, or padded into two: each token's noise
    spans its own example's scale alpha / sqrt(L d), not the row's."""
    model = load_model(str(tiny_llama_dir))
    embeddings, decoder = model.get_input_embeddings(), model.get_decoder()
    generator = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(5, 100, (n,), generator=generator).tolist(), [-100] * n) for n in (10, 30)]
    alpha, hidden = 5.0, model.config.hidden_size
    bounds = {n: embedding_noise_scale(alpha, n, hidden) for n in (10, 30)}
    for packed, rows in ((True, [examples]), (False, [[e] for e in examples])):
        batch = collate(rows, pad_id=0, packed=packed)
        clean = embeddings(batch["input_ids"])
        seen = []
        with noisy_embeddings(model, alpha):
            model.train()
            recorder = embeddings.register_forward_hook(lambda module, inputs, output: seen.append(output))
            decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            recorder.remove()
            model.eval()
            if packed:  # an embedding call after the decoder's (prompt tuning) takes the row's length
                model.train()
                outside = (embeddings(batch["input_ids"]) - clean).abs()
                model.eval()
                assert outside.max() <= embedding_noise_scale(alpha, 40, hidden) * (1 + 1e-5)
        noise = (seen[0] - clean).abs()
        spans = [(0, 0, 10), (0, 10, 30)] if packed else [(0, 0, 10), (1, 0, 30)]
        for (row, start, n) in spans:
            part = noise[row, start:start + n]
            assert bounds[n] * 0.9 < part.max() <= bounds[n] * (1 + 1e-5), (packed, n)


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
