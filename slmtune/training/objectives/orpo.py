"""Odds-ratio preference optimization (Hong et al., 2024): `train.objective: orpo`. No reference model.

With l(c), l(r) the mean token log-probabilities of the preferred and non-preferred answers:

    log odds(x) = l(x) - log(1 - exp(l(x)))
    loss = -l(c) - beta * log sigmoid(log odds(c) - log odds(r))

the first term is supervised fine-tuning on the preferred answer (a mean over its tokens, per pair),
the second pushes the odds of the preferred answer above the other's. rewards/chosen = beta * l(c),
rewards/rejected = beta * l(r) (as TRL reports them); nll and log_odds_ratio are the two terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmtune.config import ORPOObjective, Recipe
from slmtune.training.feed import Feed
from slmtune.training.loss import ObjectiveLoss, sequence_logprobs
from slmtune.training.objectives.objective import Objective
from slmtune.training.objectives.preference import PAIR_METRICS, make_pair_feed, pair_metrics


def log_odds(mean_logprob: torch.Tensor) -> torch.Tensor:
    # log(1 - p) for p = exp(l): clamped below 1 so a (near) certain answer gives a large finite value.
    return mean_logprob - torch.log1p(-torch.exp(mean_logprob).clamp(max=1 - 1e-6))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float):
    """Per-pair losses, the NLL and log-odds-ratio terms, from mean answer log-probabilities."""
    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    nll = -chosen_mean
    return nll - beta * F.logsigmoid(ratio), nll, ratio


class ORPOLoss(ObjectiveLoss):
    metric_names = PAIR_METRICS + ("nll", "log_odds_ratio")

    def __init__(self, model, cfg: ORPOObjective):
        super().__init__(model)
        self.beta = cfg.beta

    def forward(self, batch: dict, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        sums, counts = sequence_logprobs(self.model, batch, amp_dtype)
        mean = sums / counts.clamp(min=1)
        losses, nll, ratio = orpo_loss(mean[0::2], mean[1::2], self.beta)
        self.metric_sums = pair_metrics(self.beta * mean[0::2], self.beta * mean[1::2]) | {
            "nll": float(nll.detach().sum()), "log_odds_ratio": float(ratio.detach().sum())}
        return losses.sum()


def make_feed(data, recipe: Recipe, tokenizer, model, parallel) -> Feed:
    return make_pair_feed(data, recipe, tokenizer, model, parallel, precompute=False)


def loss_module(model, recipe: Recipe, feed: Feed) -> ORPOLoss:
    return ORPOLoss(model, recipe.train.objective)


OBJECTIVE = Objective(name="orpo", formats=("preference",), make_feed=make_feed, loss_module=loss_module,
                      progress_metrics=("rewards/margin", "rewards/accuracy"))
