"""Group-relative policy optimization (Shao et al., 2024): `train.objective: grpo`, what OpenAI calls
reinforcement fine-tuning. Rows are prompts (chat messages ending with the user's turn) plus any
fields the grader reads; docs/reinforcement.md shows a recipe and the service's `reinforcement` jobs.

Each optimizer step:
1. takes `prompts_per_step` prompts (an order seeded by (seed, epoch), as every feed's),
2. samples `num_generations` answers to each from the current weights through the one generation
   path (slmtune/generation.py: batched, KV cache, the same model object, no second copy), each
   answer with its own seed drawn from (seed, step), so a resumed run samples what the uninterrupted
   one would,
3. grades every answer (slmtune/graders.py) with its row as the grader's item,
4. turns rewards into group-relative advantages: A = (r - mean of the group) / (std of the group)
   (`scale_rewards: none` skips the division); a group whose answers all got the same reward has
   A = 0 for each,
5. minimizes the clipped policy loss over the answers' tokens t (ratio = p(t) / p_old(t); with one
   update per batch of samples, p_old is p itself, detached, so the ratio is 1 and the gradient is
   -A grad log p(t), as in TRL's default):

       per-token loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL(t)
       KL(t) = exp(ref(t) - log p(t)) - (ref(t) - log p(t)) - 1        (only when beta > 0)

   `loss_normalization: token` sums that over every answer token of the step and divides by their
   number (units = answer tokens); `sequence` takes each answer's token mean and averages over
   answers (units = answers). With beta 0 an answer with A = 0 adds exactly nothing to the loss
   and its gradient, so it is not run through the model at all (its tokens still count as units).

The reference for the KL: with an adapter method, the same model with its adapter disabled (no
second copy of the weights); with full fine-tuning or a `model.adapter` start, a frozen copy.

Validation (every eval_every steps and at the end, when there are validation prompts): the first
`eval_samples` validation prompts answered greedily and graded; `reward` is their mean and the
event's eval_loss is 1 - reward, so select_best and early stopping keep the most rewarded weights.
Step metrics: reward (mean over the step's answers), reward_std (mean within-group std),
reward/<name> (each sub-grader of a multi grader), zero_spread_groups (share of groups with equal
rewards: no signal), completion_length (tokens), kl (beta > 0), generate_seconds, grade_seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from slmtune.config import GRPOObjective, Recipe
from slmtune.data.batching import collate, example_steps, pack_rows
from slmtune.data.dataset import Datasets, Prompt
from slmtune.data.tokenize import IGNORE, Example
from slmtune.generation import SamplingParams, complete, generating, pad_id_of
from slmtune.grader_sandbox import run_python
from slmtune.graders import grade
from slmtune.methods import METHODS
from slmtune.models import end_of_turn_ids
from slmtune.training.attention import use_per_example_attention
from slmtune.training.feed import Feed
from slmtune.training.judge import local_judge
from slmtune.training.loss import ObjectiveLoss, autocast_dtype, target_logprobs
from slmtune.training.objectives.objective import Objective, frozen_reference, reference_scores

# Rows decoded together: a group's answers stay in one batch (they share their prompt's prefill),
# and the KV cache of a batch stays bounded however many prompts a step takes.
GENERATION_ROWS = 64

def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantages of a (groups x answers) reward matrix: reward minus its group's mean, divided by
    the group's standard deviation (+ eps) with scale_rewards "group". A group of equal rewards gets
    exactly 0 (its mean may differ from its members by a rounding error)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    flat = (rewards.max(dim=1, keepdim=True).values == rewards.min(dim=1, keepdim=True).values)
    return centred.masked_fill(flat, 0.0)


def policy_token_losses(logprobs: torch.Tensor, advantages: torch.Tensor, epsilon: float, beta: float = 0.0,
                        reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token GRPO losses from the tokens' log-probabilities under the current weights and each
    token's advantage (its answer's); returns the losses and the per-token KL (None when beta is 0)."""
    old = logprobs.detach()
    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta:
        delta = reference - logprobs
        kl = torch.exp(delta) - delta - 1
        losses = losses + beta * kl
    return losses, kl


@dataclass
class Sample:
    """One sampled answer as the loss trains on it: prompt + answer tokens, targets on the answer."""

    example: Example
    advantage: float
    group: int

    def __len__(self) -> int:
        return len(self.example)


def sample_seed(seed: int, step: int, k: int) -> int:
    """The sampling seed of answer k of a step: distinct for every (step, k) of a run (a step has at
    most 256 x 64 answers), the same after a resume."""
    return ((seed * 1_000_003 + step) * 2**15 + k) % 2**63


def sample_example(prompt_ids: list[int], answer_ids: list[int]) -> Example:
    """Prompt + answer, with the answer's tokens (its end-of-turn token too, when it ended) as targets."""
    ids = prompt_ids + answer_ids
    targets = [IGNORE] * (len(prompt_ids) - 1) + answer_ids + [IGNORE]
    return Example(ids, targets)


def collate_samples(rows: list[list[Sample]], pad_id: int, attention: str) -> dict:
    batch = collate([[s.example for s in row] for row in rows], pad_id, True, attention)
    batch["advantages"] = torch.tensor([s.advantage for row in rows for s in row], dtype=torch.float32)
    return batch


class Sampler:
    """Samples, grades and scores the answers of a step (and the greedy answers of validation)."""

    def __init__(self, model, tokenizer, recipe: Recipe):
        self.model, self.tokenizer, self.recipe = model, tokenizer, recipe
        self.cfg: GRPOObjective = recipe.train.objective
        self.eos_ids = end_of_turn_ids(model, tokenizer)
        self.ask = local_judge()  # score_model graders: the model they name, loaded on first use

    def answers(self, prompts: list[Prompt], params: list[SamplingParams]):
        """Completions of the prompts from the current weights, in eval mode and the training precision."""
        model = self.model
        amp = autocast_dtype(self.recipe.train.precision, next(model.parameters()).device)
        with generating(model, amp):
            return complete(model, self.tokenizer, [p.ids for p in prompts], params, eos_ids=self.eos_ids,
                            batch_size=self.cfg.num_generations * max(1, GENERATION_ROWS // self.cfg.num_generations))

    def grade(self, texts: list[str], items: list[dict]) -> tuple[list[float], dict[str, list[float]], int]:
        """Rewards, each sub-grader's scores, and how many answers raised a grading error."""
        rewards, subs, errors = [], {}, 0
        for text, item in zip(texts, items):
            result = grade(self.cfg.grader, text, item, ask=self.ask, run_python=run_python)
            rewards.append(result.reward)
            for name, value in result.sub_rewards.items():
                subs.setdefault(name, []).append(value)
            errors += any(v is True for v in result.errors.values())
        return rewards, subs, errors


def make_feed(data: Datasets, recipe: Recipe, tokenizer, model, parallel) -> Feed:
    cfg: GRPOObjective = recipe.train.objective
    train_cfg = recipe.train
    sampler = Sampler(model, tokenizer, recipe)
    prompts, validation = data.train, data.validation[: cfg.eval_samples]
    # Rows hold whole samples: the longest prompt plus the longest answer at least.
    row_length = max(recipe.data.max_length, max(len(p) for p in prompts + validation) + cfg.max_completion_tokens)
    attention = recipe.model.attn_implementation
    if attention == "sdpa":
        use_per_example_attention(model)  # generation passes no packed spans: plain sdpa there
    pad_id = pad_id_of(tokenizer, sampler.eos_ids)
    per_epoch = math.ceil(len(prompts) / cfg.prompts_per_step)

    def units(sample: Sample) -> int:
        """What the step's loss is a mean over: answer tokens, or answers."""
        return sample.example.n_targets() if cfg.loss_normalization == "token" else 1

    def batches_of_step(step: int) -> list[dict]:
        epoch, index = divmod(step, per_epoch)
        chosen = [prompts[i] for i in example_steps(len(prompts), cfg.prompts_per_step, train_cfg.seed, epoch)[index]]
        group = cfg.num_generations
        params = [SamplingParams(max_tokens=cfg.max_completion_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=sample_seed(train_cfg.seed, step, k))
                  for k in range(len(chosen) * group)]
        started = time.perf_counter()
        completions = sampler.answers([p for p in chosen for _ in range(group)], params)
        generated = time.perf_counter()
        rewards, subs, errors = sampler.grade([c.text for c in completions],
                                              [p.item for p in chosen for _ in range(group)])
        graded = time.perf_counter()
        reward_matrix = torch.tensor(rewards, dtype=torch.float32).view(len(chosen), group)
        advantages = group_advantages(reward_matrix, cfg.scale_rewards).flatten().tolist()
        samples = [Sample(sample_example(chosen[i // group].ids, c.token_ids), advantages[i], i // group)
                   for i, c in enumerate(completions)]
        step_units = sum(units(s) for s in samples)
        # With beta 0 an answer of advantage 0 contributes nothing: skip its forward and backward.
        trained = [s for s in samples if s.advantage != 0.0 or cfg.beta] or samples[:1]
        lengths = [len(c.token_ids) for c in completions]
        flat_groups = int((reward_matrix.max(1).values == reward_matrix.min(1).values).sum())
        metrics = {"reward": sum(rewards) / len(rewards),
                   "reward_std": float(reward_matrix.std(dim=1).mean()),
                   "zero_spread_groups": flat_groups / len(chosen),
                   "completion_length": sum(lengths) / len(lengths),
                   "generate_seconds": generated - started, "grade_seconds": graded - generated}
        metrics |= {f"reward/{name}": sum(v) / len(v) for name, v in subs.items()}
        if errors:
            metrics["grader_errors"] = errors / len(rewards)
        rows = [[trained[j] for j in row] for row in pack_rows([len(s) for s in trained], row_length)]
        micro = train_cfg.micro_batch_size
        batches = [collate_samples(rows[at : at + micro], pad_id, attention) for at in range(0, len(rows), micro)]
        for b, batch in enumerate(batches):
            batch["n_units"] = sum(units(s) for row in rows[b * micro : (b + 1) * micro] for s in row)
        # The skipped answers' units belong to the step all the same (the loss is a mean over all
        # answers); metrics are step values, spread so that the loop's sum / step units gives them back.
        batches[0]["n_units"] += step_units - sum(b["n_units"] for b in batches)
        batches[0]["step_metric_sums"] = {k: v * step_units for k, v in metrics.items()}
        return [batch | ({} if real else {"padding": True}) for batch, real in parallel.share(batches)]

    def evaluate() -> tuple[float, dict]:
        """1 - the mean reward of greedy answers to the validation prompts, and the reward metrics."""
        completions = sampler.answers(validation, [SamplingParams(max_tokens=cfg.max_completion_tokens,
                                                                  temperature=0.0)] * len(validation))
        rewards, subs, _ = sampler.grade([c.text for c in completions], [p.item for p in validation])
        reward = sum(rewards) / len(rewards)
        metrics = {"reward": round(reward, 6),
                   "completion_length": round(sum(len(c.token_ids) for c in completions) / len(completions), 3)}
        metrics |= {f"reward/{name}": round(sum(v) / len(v), 6) for name, v in subs.items()}
        return 1.0 - reward, metrics

    return Feed(per_epoch, batches_of_step, [], None, True, len(prompts),
                evaluate=evaluate if validation else None)


STEP_METRICS = ("reward", "reward_std", "zero_spread_groups", "completion_length", "generate_seconds",
                "grade_seconds")


class GRPOLoss(ObjectiveLoss):
    def __init__(self, model, cfg: GRPOObjective, reference: str | None, reference_model=None, sub_graders=()):
        super().__init__(model)
        self.cfg, self.reference = cfg, reference
        self.metric_names = (STEP_METRICS + tuple(f"reward/{n}" for n in sub_graders) + ("grader_errors",)
                             + (("kl",) if cfg.beta else ()))
        # A plain attribute, not a submodule: the frozen copy stays outside the optimizer and DDP.
        self.__dict__["reference_model"] = reference_model

    def reference_logprobs(self, batch: dict, amp_dtype) -> torch.Tensor:
        return reference_scores(self.reference, self.model, self.reference_model,
                                lambda m: target_logprobs(m, batch, amp_dtype)[0])

    def forward(self, batch: dict, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        cfg = self.cfg
        reference = self.reference_logprobs(batch, amp_dtype) if cfg.beta else None
        logprobs, sequence_ids = target_logprobs(self.model, batch, amp_dtype)
        advantages = batch["advantages"].to(logprobs.device)[sequence_ids]
        losses, kl = policy_token_losses(logprobs, advantages, cfg.epsilon, cfg.beta, reference)
        self.metric_sums = dict(batch.get("step_metric_sums", {}))
        if cfg.loss_normalization == "token":
            if kl is not None:
                self.metric_sums["kl"] = float(kl.detach().sum())
            return losses.sum()
        n = batch["n_sequences"]
        counts = torch.zeros(n, device=losses.device).index_add(0, sequence_ids, torch.ones_like(losses))
        per_answer = losses.new_zeros(n).index_add(0, sequence_ids, losses) / counts.clamp(min=1)
        if kl is not None:
            self.metric_sums["kl"] = float((kl.detach().new_zeros(n).index_add(0, sequence_ids, kl.detach())
                                            / counts.clamp(min=1)).sum())
        return per_answer.sum()


def reference_mode(recipe: Recipe) -> str | None:
    if not recipe.train.objective.beta:
        return None
    adapter = METHODS[recipe.method.name].artifact == "adapter"
    return "adapter_disabled" if adapter and not recipe.model.adapter else "copy"


def loss_module(model, recipe: Recipe, feed: Feed) -> GRPOLoss:
    mode = reference_mode(recipe)
    reference_model = frozen_reference(model, recipe) if mode == "copy" else None
    grader = recipe.train.objective.grader
    sub_graders = tuple(grader["graders"]) if grader["type"] == "multi" else ()
    return GRPOLoss(model, recipe.train.objective, mode, reference_model, sub_graders)


OBJECTIVE = Objective(name="grpo", formats=("reinforcement",), make_feed=make_feed, loss_module=loss_module,
                      progress_metrics=("reward", "completion_length"))
