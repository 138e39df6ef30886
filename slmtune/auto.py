"""The "auto" rule: training length, learning rate, batch size, held-out validation and evaluation
frequency from the size of the user's data, for every door (recipes and `slmtune train` through
`run()`, the service's "auto" hyperparameters through service/hyper.py). One place, so the CLI and
the service resolve the same values for the same file (tests/test_auto.py checks it).

    epochs          supervised: the larger of ceil(500 / n) and ceil(12,000 / t), clamped to [3, 10]:
                    about 500 example passes and 12,000 target-token passes, where t is the number
                    of answer tokens an epoch trains on: the file's (the base model's tokenizer;
                    Datasets.n_target_tokens) times the share not held out for validation. Short
                    answers need more epochs: 288 one-label classification rows (1,476 tokens, 32
                    rows held out: t = 1,312) get 10, 75 product-facts conversations (t = 1,824) get 7,
                    long answers from 167 examples on get 3. Answers a task copies from its row
                    (tasks' COPIED_FROM: extractive QA's context) are not counted (data/dataset.py
                    learned_share): 300 SQuAD-style rows scored F1 0.637 / 0.626 / 0.590 at 1 / 3 /
                    7 epochs, while 300 NER rows (entity lists: labels learned) went 0.000 -> 0.471
                    from 1 to the token term's 7 (benchmarks/auto_sweep.py, docs/benchmarks.md).
                    dpo / orpo: ceil(360 / n pairs) clamped to [2, 10].
                    grpo: ceil(400 / n prompts) clamped to [1, 10] (each pass samples 8 answers a prompt).
    learning_rate   the method's base rate (methods/<name>.py: 1e-3 for LoRA, QLoRA, DoRA;
                    5e-5 for full fine-tuning), times DPO_LEARNING_RATE_SCALE (0.2) for preference
                    objectives (DPO's beta 0.1 and sft_weight 1), GRPO_LEARNING_RATE_SCALE (0.5) for grpo
    batch_size      examples per step: 1 if n < 100, 4 if n < 1024, else 8; a service job's
                    batch, and a recipe's examples_per_step below EXAMPLE_STEPS_BELOW examples when it
                    sets no step size (from 1024 on, recipes step every 8 packed rows)
    held out        no validation file: none below HOLD_OUT_FROM examples, else 10% clamped to
                    [HOLD_OUT_MIN, HOLD_OUT_MAX], seeded (slmtune/data/dataset.py)
    eval_every      about EVALUATIONS_PER_RUN evaluations per run

n is the number of examples (pairs) in the training file, before any is held out.

Why these numbers (docs/benchmarks.md, "The auto rule"): small datasets of facts must actually be
learned; 25 facts x 3 conversations answered 18 of 25 paraphrased questions at batch 4 (one seed),
17-20 at batch 2 and 19-24 at batch 1 (7 epochs, three seeds side by side), hence SMALL_BATCH_BELOW.
With 75 support conversations about a fictional product (examples/support_assistant),
7 epochs at LoRA's 1e-3 took SmolLM2-135M-Instruct from 0/15 to 14/15 facts on paraphrased held-out
questions, where the earlier 2e-4 x 3 epochs left them unlearned; a classification set of 8 intents
and ~300 rows went from 0.74 accuracy (1 epoch, 2e-4) to 0.79-0.84 at 3 epochs (the examples rule
alone), 0.89 at 6 and 0.91 at 10 epochs, while 25 facts x 3 conversations peak at 7 epochs (21/25;
18/25 at 5 and at 10): docs/benchmarks.md, "The auto rule on a user's own data". Both optima sit
near 12-13k target-token passes, hence the token term: the examples rule alone under-trains sets
whose answers are a few tokens (labels), which the rows' count cannot tell from long answers.
With 120 style pairs (examples/preference: the preferred answers open with "In short:"), DPO at
beta 0.1, 3 epochs, batch 4 on SmolLM2-135M-Instruct with LoRA: at 1e-3 (the SFT rate) the model
degenerated ("In short short: in short: ..."; 1/20 held-out answers right); at 1e-4, 14/20; at 2e-4
with the preferred answers' NLL added (sft_weight 1, RPO), 20/20 with fluent answers. Hence
DPO_LEARNING_RATE_SCALE 0.2 and DPO_SFT_WEIGHT 1 (docs/benchmarks.md, "DPO's auto values").
"""

from __future__ import annotations

import math

from slmtune.methods import METHODS

SFT_EXAMPLE_PASSES = 500
SFT_TARGET_TOKEN_PASSES = 12_000
SFT_EPOCHS = (3, 10)
PREFERENCE_PAIR_PASSES = 360
PREFERENCE_EPOCHS = (2, 10)
PREFERENCE_OBJECTIVE_NAMES = ("dpo", "orpo")
DPO_LEARNING_RATE_SCALE = 0.2  # times the method's base rate
DPO_BETA = 0.1
DPO_SFT_WEIGHT = 1.0  # the preferred answers' NLL in the loss (RPO): the config's default too
# Reinforcement fine-tuning (train.objective grpo): a step samples GRPO_GENERATIONS answers to each of
# GRPO_PROMPTS_PER_STEP prompts (32 answers, TRL's and OpenAI's usual group sizes).
GRPO_PROMPT_PASSES = 400
GRPO_EPOCHS = (1, 10)
GRPO_LEARNING_RATE_SCALE = 0.5  # times the method's base rate
GRPO_GENERATIONS = 8
GRPO_PROMPTS_PER_STEP = 4
GRPO_MAX_COMPLETION_TOKENS = 64
GRPO_EVAL_SAMPLES = 32

EXAMPLE_STEPS_BELOW = 1024  # a recipe without a step size: examples_per_step = batch_size(n) below this
# Below this many examples, 1 per step: small sets need the updates. 75 fact conversations through
# the service, 7 epochs at 1e-3, answered 18 of 25 paraphrased questions at batch 4 and 24 at batch 2
# (one seed, 2026-12-04); over three seeds side by side on one machine (2026-12-05), batch 2 gave
# 20 / 17 / 19 and batch 1 24 / 19 / 23 (docs/benchmarks.md, "The auto rule on a user's own data").
SMALL_BATCH_BELOW = 100
HOLD_OUT_FROM = 200
HOLD_OUT_SHARE = 0.1
HOLD_OUT_MIN, HOLD_OUT_MAX = 32, 256
EVALUATIONS_PER_RUN = 5
SCORED_VALIDATION_ROWS = 256  # train.select_by metric answers at most this many validation rows (seeded)


def epochs(n_examples: int, objective: str = "sft", target_tokens: int | None = None, held_out: int = 0) -> int:
    """Epochs for a training file of `n_examples` examples (pairs, for preference objectives) whose
    answers hold `target_tokens` tokens in all (supervised only; None: the examples term alone, for
    callers that have not tokenized the file), `held_out` of the examples kept for validation."""
    n = max(1, n_examples)
    if objective in PREFERENCE_OBJECTIVE_NAMES:
        lo, hi = PREFERENCE_EPOCHS
        return min(hi, max(lo, math.ceil(PREFERENCE_PAIR_PASSES / n)))
    if objective == "grpo":
        lo, hi = GRPO_EPOCHS
        return min(hi, max(lo, math.ceil(GRPO_PROMPT_PASSES / n)))
    lo, hi = SFT_EPOCHS
    # The held-out share's tokens, estimated in proportion, so that the service (which counts the
    # file before the job's seed picks the rows) and run() (after) resolve the same value.
    trained_tokens = target_tokens * (n - min(held_out, n - 1)) / n if target_tokens else 0
    by_tokens = math.ceil(SFT_TARGET_TOKEN_PASSES / trained_tokens) if trained_tokens else 0
    return min(hi, max(lo, math.ceil(SFT_EXAMPLE_PASSES / n), by_tokens))


def tokens_enough(n_examples: int, held_out: int = 0) -> int:
    """Answer tokens from which `epochs` of a supervised file no longer depends on them (the token
    term is at most the lower clamp): a counter may stop there, as the service's does
    (service/hyper.target_tokens_of), so counting a large upload costs a bounded number of rows."""
    n = max(1, n_examples)
    lo, _ = SFT_EPOCHS
    # +1: a float product exactly at the threshold must not round below it in epochs()
    return math.ceil(SFT_TARGET_TOKEN_PASSES * n / (lo * (n - min(held_out, n - 1)))) + 1


def learning_rate(method: str, objective: str = "sft") -> float:
    """The learning rate "auto" trains `method` with."""
    scale = (DPO_LEARNING_RATE_SCALE if objective in PREFERENCE_OBJECTIVE_NAMES
             else GRPO_LEARNING_RATE_SCALE if objective == "grpo" else 1.0)
    return METHODS[method].auto_learning_rate * scale


def batch_size(n_examples: int) -> int:
    """Examples per optimizer step of a service job, and of a recipe of fewer than EXAMPLE_STEPS_BELOW
    examples that sets no step size."""
    n = max(1, n_examples)
    return 1 if n < SMALL_BATCH_BELOW else 4 if n < EXAMPLE_STEPS_BELOW else 8


def held_out(n_examples: int) -> int:
    """How many training examples are held out for validation when no validation file is given."""
    if n_examples < HOLD_OUT_FROM:
        return 0
    return min(HOLD_OUT_MAX, max(HOLD_OUT_MIN, round(HOLD_OUT_SHARE * n_examples)))


def eval_every(total_steps: int) -> int:
    """Steps between evaluations: about EVALUATIONS_PER_RUN per run (the last one at the end)."""
    return max(1, math.ceil(total_steps / EVALUATIONS_PER_RUN))
