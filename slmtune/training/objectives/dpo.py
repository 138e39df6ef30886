"""Direct preference optimization, sigmoid loss (Rafailov et al., 2023): `train.objective: dpo`.

For a pair with answers c (preferred) and r, policy log-probabilities log p(c), log p(r) (summed
over the answer's tokens) and the reference model's log q(c), log q(r):

    h = (log p(c) - log q(c)) - (log p(r) - log q(r))
    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)      (eps: label_smoothing)
           + sft_weight * (-log p(c) / tokens of c)                                  (RPO; sft_weight 1 by default, 0: plain DPO)

rewards/chosen = beta * (log p(c) - log q(c)), rewards/rejected likewise, rewards/margin their
difference, rewards/accuracy the share of pairs whose chosen reward is higher.

The reference (train.objective.reference): with an adapter method, the same model with its adapter
disabled (no second copy of the weights); with full fine-tuning or a `model.adapter` start, the
starting weights' log-probabilities precomputed in one pass before training; or a frozen copy.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from slmtune.config import DPOObjective, Recipe
from slmtune.methods import METHODS
from slmtune.training.feed import Feed
from slmtune.training.loss import ObjectiveLoss, sequence_logprobs
from slmtune.training.objectives.objective import Objective, frozen_reference, reference_scores
from slmtune.training.objectives.preference import PAIR_METRICS, make_pair_feed, pair_metrics


def reference_mode(recipe: Recipe) -> str:
    mode = recipe.train.objective.reference
    if mode != "auto":
        return mode
    adapter = METHODS[recipe.method.name].artifact == "adapter"
    return "adapter_disabled" if adapter and not recipe.model.adapter else "precomputed"


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen / rejected rewards, from summed answer log-probabilities."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    logits = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen_rewards, rejected_rewards


class DPOLoss(ObjectiveLoss):
    metric_names = PAIR_METRICS

    def __init__(self, model, cfg: DPOObjective, reference: str, reference_model=None):
        super().__init__(model)
        self.beta, self.label_smoothing, self.reference = cfg.beta, cfg.label_smoothing, reference
        self.sft_weight = cfg.sft_weight
        if cfg.sft_weight:
            self.metric_names = PAIR_METRICS + ("nll/chosen",)
        # A plain attribute, not a submodule: the frozen copy must stay outside the optimizer and
        # outside what DDP/FSDP wrap and synchronize.
        self.__dict__["reference_model"] = reference_model

    def reference_logprobs(self, batch: dict, amp_dtype) -> torch.Tensor:
        if "reference_logprobs" in batch:
            return batch["reference_logprobs"].to(next(self.model.parameters()).device)
        return reference_scores(self.reference, self.model, self.reference_model,
                                lambda m: sequence_logprobs(m, batch, amp_dtype)[0])

    def forward(self, batch: dict, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        reference = self.reference_logprobs(batch, amp_dtype)
        policy, counts = sequence_logprobs(self.model, batch, amp_dtype)
        losses, chosen, rejected = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                                            self.beta, self.label_smoothing)
        self.metric_sums = pair_metrics(chosen, rejected)
        if self.sft_weight:
            chosen_nll = -policy[0::2] / counts[0::2].clamp(min=1)
            losses = losses + self.sft_weight * chosen_nll
            self.metric_sums["nll/chosen"] = float(chosen_nll.detach().sum())
        return losses.sum()


def make_feed(data, recipe: Recipe, tokenizer, model, parallel) -> Feed:
    return make_pair_feed(data, recipe, tokenizer, model, parallel, precompute=reference_mode(recipe) == "precomputed")


def loss_module(model, recipe: Recipe, feed: Feed) -> DPOLoss:
    mode = reference_mode(recipe)
    reference_model = frozen_reference(model, recipe) if mode == "copy" else None
    return DPOLoss(model, recipe.train.objective, mode, reference_model)


OBJECTIVE = Objective(name="dpo", formats=("preference",), make_feed=make_feed, loss_module=loss_module,
                      progress_metrics=("rewards/margin", "rewards/accuracy"))
