"""The training loss: next-token cross-entropy summed over target positions only.

`target_loss_sum` is what every objective's step and every evaluation computes; `TargetLoss` wraps
it as the one module DDP, FSDP and DeepSpeed wrap (slmtune/training/distributed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    base = unwrap(model)
    device = next(model.parameters()).device
    targets = batch["targets"].to(device)
    select = targets != IGNORE
    if prompt_learning_config(model) is not None:
        return prompt_learning_loss_sum(model, batch, targets, select, amp_dtype)
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
    hidden, targets = hidden[select], targets[select]
    head, softcap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
    weight = getattr(head, "weight", None)
    # ZeRO-3 gathers a weight only inside its module's forward (ds_id marks such a parameter).
    fusable = (type(head) is torch.nn.Linear and head.bias is None and not softcap and not hasattr(weight, "ds_id")
               and weight.dim() == 2 and weight.shape[1] == hidden.shape[-1])
    if cross_entropy == "fused" and fusable:
        return linear_cross_entropy_sum(hidden, weight, targets, amp_dtype or weight.dtype, loss_chunk_tokens)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = head(hidden)
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


class TargetLoss(torch.nn.Module):
    """`target_loss_sum` as a module's forward: the one module DDP, FSDP and DeepSpeed wrap."""

    def __init__(self, model, cross_entropy: str = "fused", loss_chunk_tokens: int | None = None):
        super().__init__()
        self.model = model
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
