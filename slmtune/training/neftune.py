"""NEFTune: uniform noise added to the input embeddings while training (Jain et al., 2023,
"NEFTune: Noisy Embeddings Improve Instruction Finetuning"), `train.neftune_alpha` in a recipe.

Each embedding entry gets noise from U(-s, s), s = alpha / sqrt(L * d), L the row's length in tokens
and d the hidden size (the paper's scale; TRL's and transformers' `neftune_noise_alpha` use the
padded length the same way). With packing, L is the packed row's length, so the noise per token is
smaller than on the same examples unpacked. Only modules in training mode are perturbed: evaluation
and generation (model.eval()) see the clean embeddings.

    train: {neftune_alpha: 5}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


def embedding_noise_scale(alpha: float, length: int, hidden: int) -> float:
    """The half-width s of the uniform noise on a row of `length` tokens of `hidden` dimensions."""
    return alpha / math.sqrt(length * hidden)


@contextlib.contextmanager
def noisy_embeddings(model: torch.nn.Module, alpha: float | None) -> Iterator[None]:
    """Within the block, `model`'s input embeddings carry NEFTune noise in training mode; a falsy
    `alpha` leaves the model untouched."""
    if not alpha:
        yield
        return
    embeddings = model.get_input_embeddings()

    def add_noise(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = embedding_noise_scale(alpha, output.size(-2), output.size(-1))
        return output + torch.empty_like(output).uniform_(-scale, scale)

    handle = embeddings.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()
