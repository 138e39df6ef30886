"""Per-example attention for packed rows: a transformers attention function that runs SDPA on each
packed example's span alone, instead of one whole-row attention under a block-diagonal mask.

    use_per_example_attention(model)   # what run() does for packed rows with model.attn_implementation: sdpa

Registering the function adds a name to transformers' global AttentionInterface and
AttentionMaskInterface registries (process-wide, idempotent): the name is ours and registering it
again replaces it with the same function, so nothing else in the process changes behaviour. Only
the model switched with `use_per_example_attention` uses it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from slmtune.methods.peft_common import unwrap

PER_EXAMPLE_SDPA = "slmtune_per_example_sdpa"
# Examples up to this many tokens take SDPA's math kernel: on CPU its backward (plain matmuls over
# saved probabilities) is faster than the flash kernel's at chat lengths (docs/benchmarks.md). It
# keeps heads x length^2 probabilities per example for backward, so longer examples take flash.
MATH_ATTENTION_MAX_TOKENS = 256


def per_example_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packed_examples=None, **kwargs):
    """Attention of packed rows computed on each packed example alone (transformers' attention
    interface; `use_per_example_attention` switches a model to it).

    `packed_examples` lists, per row, the (start, length) spans of the examples packed into it, back
    to back from column 0. A packed row of 1024 tokens holding eight 128-token examples needs 8 small
    causal attentions, not one 1024 x 1024 attention with the block-diagonal mask: PyTorch's CPU flash
    kernel computes every masked block too. Same result as the masked attention on every real token.
    Without `packed_examples` (unpacked rows, generation) it is plain sdpa with the given mask."""
    if packed_examples is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]

    rows = []
    for b, spans in enumerate(packed_examples):
        parts, end = [], 0
        for start, length in spans:
            q, k, v = (t[b : b + 1, :, start : start + length] for t in (query, key, value))
            # The kernel choice was measured on CPU; elsewhere SDPA picks its own (cuDNN, mem-efficient...).
            kernels = ([SDPBackend.MATH] if length <= MATH_ATTENTION_MAX_TOKENS
                       else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
            with sdpa_kernel(kernels) if q.device.type == "cpu" else contextlib.nullcontext():
                parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout,
                                                            enable_gqa=gqa))
            end = start + length
        if end < query.shape[2]:
            # Padding after the last example: no real token attends to it and its outputs are never
            # scored, so zeros stand in for the attention of pads to themselves.
            parts.append(parts[0].new_zeros((1, query.shape[1], query.shape[2] - end, value.shape[-1])))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_per_example_attention(model) -> None:
    """Switch a loaded sdpa model (or the base of a PEFT model) to `per_example_sdpa`."""
    AttentionInterface.register(PER_EXAMPLE_SDPA, per_example_sdpa)
    AttentionMaskInterface.register(PER_EXAMPLE_SDPA, sdpa_mask)
    base = unwrap(model)
    base.set_attn_implementation(PER_EXAMPLE_SDPA)
