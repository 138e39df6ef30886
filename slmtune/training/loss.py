"""Losses on target positions only: the decoder runs on the whole batch, the LM head only where a
token is predicted.

target_loss_sum     next-token cross-entropy summed over targets (SFT; evaluation losses)
target_logprobs     per-token log-probabilities, summed per sequence by sequence_logprobs
                    (preference and policy objectives: slmtune/training/objectives/)
ObjectiveLoss       the module the loop and every distributed strategy wrap; TargetLoss is SFT's
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slmtune.data.tokenize import IGNORE
from slmtune.methods.peft_common import prompt_learning_config, unwrap
from slmtune.models import has_native_bf16
from slmtune.training.attention import PER_EXAMPLE_SDPA
from slmtune.training.cross_entropy import linear_cross_entropy_sum


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. bf16 is autocast only: master weights and optimizer stay fp32."""
    if precision == "bf16" or (precision == "auto" and has_native_bf16(device)):
        return torch.bfloat16
    return None


def target_hidden(model, batch: dict, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the decoder (no LM head) on a batch; returns the hidden states at target positions, their
    target tokens, and the boolean mask of those positions in the batch."""
    base = unwrap(model)
    device = next(model.parameters()).device
    targets = batch["targets"].to(device)
    select = targets != IGNORE
    # Only a model switched to per-example attention is given the spans (other attention code
    # need not accept the extra argument).
    per_example = "packed_examples" in batch and base.config._attn_implementation == PER_EXAMPLE_SDPA
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        hidden = base.get_decoder()(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            use_cache=False,
            **({"packed_examples": batch["packed_examples"]} if per_example else {}),
        ).last_hidden_state
    return hidden[select], targets[select], select


def _head_logits(base, hidden: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """fp32 logits of the LM head (with the model's soft-capping, if any) for some hidden states."""
    head, softcap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
    with torch.autocast(hidden.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = head(hidden)
    logits = logits.float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def target_loss_sum(model, batch: dict, amp_dtype: torch.dtype | None, cross_entropy: str = "fused",
                    loss_chunk_tokens: int | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over target positions only.

    The LM head runs on target positions alone: prompt tokens need no logits, and a full
    tokens x vocabulary logits tensor (49k columns for SmolLM2) is the largest activation of a step.
    `cross_entropy: fused` (slmtune/training/cross_entropy.py) runs the head and the loss on
    `loss_chunk_tokens` targets at a time with their gradients made in forward, so targets x
    vocabulary logits never exist at once; `plain` is one F.cross_entropy over all targets' logits
    (also used for heads the fused path does not cover: a bias, logit soft-capping, sharded weights).
    """
    if prompt_learning_config(model) is not None:
        device = next(model.parameters()).device
        targets = batch["targets"].to(device)
        return prompt_learning_loss_sum(model, batch, targets, targets != IGNORE, amp_dtype)
    base = unwrap(model)
    hidden, targets, _ = target_hidden(model, batch, amp_dtype)
    head, softcap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
    weight = getattr(head, "weight", None)
    # ZeRO-3 gathers a weight only inside its module's forward (ds_id marks such a parameter).
    fusable = (type(head) is torch.nn.Linear and head.bias is None and not softcap and not hasattr(weight, "ds_id")
               and weight.dim() == 2 and weight.shape[1] == hidden.shape[-1])
    if cross_entropy == "fused" and fusable:
        return linear_cross_entropy_sum(hidden, weight, targets, amp_dtype or weight.dtype, loss_chunk_tokens)
    return F.cross_entropy(_head_logits(base, hidden, amp_dtype), targets, reduction="sum")


LOGPROB_CHUNK_TOKENS = 256


def target_logprobs(model, batch: dict, amp_dtype: torch.dtype | None,
                    chunk_tokens: int = LOGPROB_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every target token (1-D, in batch order) and the sequence each belongs to
    (batch["sequence_ids"] at its position): what preference and policy objectives sum per sequence.

    The head runs on `chunk_tokens` targets at a time under activation checkpointing: a chunk's
    targets x vocabulary logits exist only while its log-softmax is taken, in forward and again in
    backward, so memory stays bounded by one chunk whatever the batch holds."""
    base = unwrap(model)
    hidden, targets, select = target_hidden(model, batch, amp_dtype)
    sequence_ids = batch["sequence_ids"].to(hidden.device)[select]

    def chunk_logprobs(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(_head_logits(base, h, amp_dtype), dim=-1).gather(-1, t[:, None])[:, 0]

    parts = []
    for at in range(0, len(targets), chunk_tokens):
        h, t = hidden[at : at + chunk_tokens], targets[at : at + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(chunk_logprobs, h, t, use_reentrant=False))
        else:
            parts.append(chunk_logprobs(h, t))
    logprobs = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return logprobs, sequence_ids


def sequence_logprobs(model, batch: dict, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of the batch: the summed log-probability of its target tokens, and their count."""
    logprobs, sequence_ids = target_logprobs(model, batch, amp_dtype)
    n = batch["n_sequences"]
    sums = logprobs.new_zeros(n).index_add(0, sequence_ids, logprobs)
    counts = torch.zeros(n, device=logprobs.device).index_add(0, sequence_ids, torch.ones_like(logprobs))
    return sums, counts


class ObjectiveLoss(torch.nn.Module):
    """What the loop minimizes: forward(batch, amp_dtype) returns the loss summed over the batch's
    `n_units`, and leaves the objective's own metrics, also summed over units, in `metric_sums`
    (the loop averages both over the units of the step). This module is what DDP, FSDP and
    DeepSpeed wrap (slmtune/training/distributed.py)."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.metric_sums: dict[str, float] = {}


class TargetLoss(ObjectiveLoss):
    """`target_loss_sum` as the loss module (supervised fine-tuning; units are target tokens)."""

    def __init__(self, model, cross_entropy: str = "fused", loss_chunk_tokens: int | None = None):
        super().__init__(model)
        self.cross_entropy = cross_entropy
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, batch: dict, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        return target_loss_sum(self.model, batch, amp_dtype, self.cross_entropy, self.loss_chunk_tokens)


def prompt_learning_loss_sum(model, batch, targets, select, amp_dtype) -> torch.Tensor:
    """Prompt and prefix tuning inject virtual tokens inside PeftModel.forward, so they need the
    full forward (and an unpacked 2D mask); logits of virtual positions come first and are dropped."""
    device = targets.device
    input_ids = batch["input_ids"].to(device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits[:, -input_ids.shape[1]:][select].float()
    return F.cross_entropy(logits, targets[select], reduction="sum")
