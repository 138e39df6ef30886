"""Training objectives, one file each: what a training example is, how examples become the
micro-batches of each step, and the loss the loop minimizes (one trainer per objective, one loop).

    objective = OBJECTIVES[recipe.train.objective.name]
    feed = objective.make_feed(data, recipe, tokenizer, model, parallel)   # slmtune/training/feed.py
    loss = objective.loss_module(model, recipe, feed)                       # an ObjectiveLoss

To add an objective: its config class in slmtune/config.py (a `name` literal, like SFTObjective),
`objectives/<name>.py` ending with `OBJECTIVE = Objective(...)`, and one line in OBJECTIVES below.
"""

from __future__ import annotations

from slmtune.training.objectives import dpo, grpo, orpo, sft
from slmtune.training.objectives.objective import Objective

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (sft.OBJECTIVE, dpo.OBJECTIVE, orpo.OBJECTIVE, grpo.OBJECTIVE)}
