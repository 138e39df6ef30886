"""NEFTune: uniform noise added to the input embeddings while training (Jain et al., 2023,
"NEFTune: Noisy Embeddings Improve Instruction Finetuning"), `train.neftune_alpha` in a recipe.

Each embedding entry gets noise from U(-s, s), s = alpha / sqrt(L * d), L the length in tokens of
the example the token belongs to and d the hidden size (the paper's scale). L is read from the
position ids the decoder is called with (each example counts from 0), so a packed row of several
examples gives each its own scale and packing does not change the noise: the same example gets
the same scale packed or padded. (TRL's and transformers' `neftune_noise_alpha` take the padded
row's length instead, which shrinks the noise of short examples in a long batch.) A forward
without position ids, or an embedding call outside the decoder's (prompt tuning), falls back to the
row's length. Only modules in training mode are perturbed: evaluation and generation (model.eval())
see the clean embeddings.

    train: {neftune_alpha: 5}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from slmtune.methods.peft_common import unwrap


def embedding_noise_scale(alpha: float, length, hidden: int):
    """The half-width s of the uniform noise on an example of `length` tokens of `hidden` dimensions;
    `length` an int, or a tensor of lengths (one scale each)."""
    return alpha / (length * hidden) ** 0.5


def example_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, tokens] -> the length of the example each token belongs to, from position ids that
    restart at 0 for every example (padding after the last example counts as examples of its own)."""
    starts = position_ids == 0
    starts[:, 0] = True
    example = starts.long().cumsum(dim=1) - 1  # 0, 1, ... within each row
    lengths = torch.zeros_like(example)
    lengths.scatter_add_(1, example, torch.ones_like(example))
    return lengths.gather(1, example)


@contextlib.contextmanager
def noisy_embeddings(model: torch.nn.Module, alpha: float | None) -> Iterator[None]:
    """Within the block, `model`'s input embeddings carry NEFTune noise in training mode; a falsy
    `alpha` leaves the model untouched."""
    if not alpha:
        yield
        return
    embeddings = model.get_input_embeddings()
    decoder = unwrap(model).get_decoder()
    seen = {"position_ids": None}

    def remember_positions(module: torch.nn.Module, args, kwargs) -> None:
        # The embedding layer sees only token ids: the decoder's call says where examples start.
        seen["position_ids"] = kwargs.get("position_ids")

    def forget_positions(module: torch.nn.Module, args, output) -> None:
        # An embedding call outside the decoder (prompt tuning embeds before it) must not take the
        # previous forward's positions.
        seen["position_ids"] = None

    def add_noise(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        positions, hidden = seen["position_ids"], output.size(-1)
        if positions is not None and positions.shape == output.shape[:-1]:
            lengths = example_lengths(positions).to(output.device, torch.float32)
            scale = embedding_noise_scale(alpha, lengths, hidden).unsqueeze(-1).to(output.dtype)
        else:
            scale = embedding_noise_scale(alpha, output.size(-2), hidden)
        return output + torch.empty_like(output).uniform_(-1, 1) * scale

    handles = [decoder.register_forward_pre_hook(remember_positions, with_kwargs=True),
               decoder.register_forward_hook(forget_positions, always_call=True),
               embeddings.register_forward_hook(add_noise)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
