"""A model in memory answers task rows and the task scores the answers: the one code path of
`slmtune eval` (slmtune/evaluate.py, which adds loading, loss metrics and the report) and of a
run's checkpoint selection by task metric (`train.select_by: metric`, on the validation split).

    answers = answer_rows(model, tokenizer, "classification", rows, context, system_prompt=None)
    metrics = TASKS["classification"].score(answers.predictions, rows)
    metrics = score_rows(model, tokenizer, "qa", rows, context, system_prompt=None)   # the same, in one call

Rows become prompts through the task's template (as in training); answers are greedy, batched,
through slmtune.generation.complete (what serving uses too); the task parses each answer.
`metric_interval` says how far a score on this many rows can be trusted (a bootstrap over the rows).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slmtune.generation import SamplingParams, chat_prompt_ids, complete, generating
from slmtune.models import end_of_turn_ids
from slmtune.tasks import TASKS
from slmtune.tasks.common import split_last_assistant

DEFAULT_BATCH_SIZE = 8
INTERVAL_LEVEL = 0.95
INTERVAL_RESAMPLES = 1000
INTERVAL_MIN_RESAMPLES = 200  # fewer (a slow metric on a large file): no interval rather than a rough one
INTERVAL_SECONDS = 10.0


@dataclass
class Answers:
    prompts: list[list[dict]]  # the conversation each answer continues (system prompt included)
    references: list  # the reference answer of each row
    outputs: list[str]  # what the model wrote
    predictions: list  # the task's parse of each output


def states_fact(answer: str, answer_contains: list[str]) -> bool:
    """Whether an answer to a held-out question states its fact: it contains any of the expected
    strings, case-insensitively (the `answer_contains` of examples/product_facts' and
    examples/support_assistant's held-out questions)."""
    return any(key.lower() in answer.lower() for key in answer_contains)


def generate_batched(model, tokenizer, prompts: list[list[dict]], *, batch_size: int, max_new_tokens: int,
                     eos_ids: set[int], on_batch=None, tools: list[list | None] | None = None) -> list[str]:
    """Greedy replies to chat prompts (each with its `tools`, if any), `batch_size` at a time
    (slmtune.generation.complete), in prompt order."""
    encoded = [chat_prompt_ids(tokenizer, p, t) for p, t in zip(prompts, tools or [None] * len(prompts))]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    replies = complete(model, tokenizer, encoded, params, batch_size=batch_size, eos_ids=set(eos_ids),
                       on_batch=on_batch)
    return [c.text.strip() for c in replies]


def answer_rows(model, tokenizer, task: str, rows: list[dict], context: dict, *, system_prompt: str | None,
                batch_size: int = DEFAULT_BATCH_SIZE, max_new_tokens: int | None = None,
                on_batch=None) -> Answers:
    """The model's greedy answer to each task row's prompt (the task's template with `context`, the
    dataset-level settings such as the label set), parsed by the task. `max_new_tokens` defaults to
    the task's MAX_NEW_TOKENS."""
    module = TASKS[task]
    budget = module.MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    prompts, references, tools = [], [], []
    for row in rows:
        example = module.to_example(row, **context)
        prompt, reference = split_last_assistant(example["messages"])
        if system_prompt and (not prompt or prompt[0]["role"] != "system"):
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        prompts.append(prompt)
        references.append(reference)
        tools.append(example.get("tools"))
    outputs = generate_batched(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=budget,
                               eos_ids=end_of_turn_ids(model, tokenizer), on_batch=on_batch, tools=tools)
    predictions = [module.parse(text, row, **context) for text, row in zip(outputs, rows)]
    return Answers(prompts, references, outputs, predictions)


def score_rows(model, tokenizer, task: str, rows: list[dict], context: dict, *, system_prompt: str | None,
               batch_size: int = DEFAULT_BATCH_SIZE, amp_dtype: torch.dtype | None = None) -> dict:
    """The task's metrics of the model's answers to `rows`, in eval mode (the model's mode is restored)
    and, with `amp_dtype`, under the training's autocast (slmtune.generation.generating)."""
    with generating(model, amp_dtype):
        answers = answer_rows(model, tokenizer, task, rows, context, system_prompt=system_prompt,
                              batch_size=batch_size)
    return TASKS[task].score(answers.predictions, rows)


def metric_interval(metric: Callable[[list, list], float | None], predictions: list, rows: list, *,
                    resamples: int = INTERVAL_RESAMPLES, seconds: float = INTERVAL_SECONDS,
                    seed: int = 0) -> dict | None:
    """A 95% percentile-bootstrap interval of `metric(predictions, rows)`: the rows drawn with
    replacement `resamples` times (seeded: the same draws every time; a run cut short by `seconds`
    uses a prefix of them, and the report says how many), the metric recomputed on each draw. It is
    what the test file's size allows, not the model's variation between training seeds.
    None with fewer than 2 rows, a metric that is not a number, or when fewer than
    INTERVAL_MIN_RESAMPLES draws fit in `seconds`."""
    n = len(rows)
    if n < 2:
        return None
    rng, values, deadline = random.Random(seed), [], time.monotonic() + seconds
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        value = metric([predictions[i] for i in picks], [rows[i] for i in picks])
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return None
        values.append(float(value))
        if time.monotonic() > deadline:
            break
    if len(values) < INTERVAL_MIN_RESAMPLES:
        return None
    values.sort()
    tail = (1 - INTERVAL_LEVEL) / 2
    low = values[math.floor(tail * (len(values) - 1))]
    high = values[math.ceil((1 - tail) * (len(values) - 1))]
    return {"level": INTERVAL_LEVEL, "low": low, "high": high, "resamples": len(values), "method": "bootstrap"}
