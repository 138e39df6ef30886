"""`slmtune eval`: score a base model or a fine-tuned run on task data.

    slmtune eval runs/ner --data ../shared/data/ner/test.jsonl --limit 200
    slmtune eval smollm2-135m-instruct --data test.jsonl --task qa --output runs/base-qa.json

Rows are turned into prompts by the task's template (slmtune/tasks/<task>.py), exactly as in
training; the model answers with batched greedy decoding through the one generation path
(slmtune/generation.py, which serving uses too); the task parses each answer and scores the predictions. Tasks measured by
loss (domain: perplexity; chat: validation loss, besides ROUGE-L of generated replies) use the
target-only loss of training (`slmtune.training.loss.target_loss_sum`).

Results go to eval.json in the run directory (or --output): the metrics, the settings and every
example's prompt, raw output, parsed prediction and reference. A table of metrics is printed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slmtune import atomic
from slmtune.data.batching import collate
from slmtune.data.formats import DataError, Record, iter_jsonl
from slmtune.data.tokenize import encode
from slmtune.data.validate import read_records
from slmtune.generation import SamplingParams, chat_prompt_ids, complete
from slmtune.models import end_of_turn_ids
from slmtune.tasks import TASKS, detect_task
from slmtune.tasks.common import split_last_assistant
from slmtune.training.loss import autocast_dtype, target_loss_sum
from slmtune.training.rundir import RunDir, load_for_inference

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 1024  # tokens per example for loss-based metrics when no recipe says otherwise
LOSS_TARGET_TOKENS = 4096  # target tokens per loss batch: bounds the (tokens x vocabulary) logits


@dataclass
class EvalResult:
    report: dict
    path: Path | None


def run_recipe(target: str):
    """(RunDir, its recipe) when `target` is a run directory, else (None, None)."""
    if RunDir.holds_run(target):
        run_dir = RunDir(target)
        return run_dir, run_dir.recipe()
    return None, None


def resolve_task(task: str | None, recipe, data: str) -> str:
    if task:
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        return task
    if recipe is not None and recipe.data.task:
        return recipe.data.task
    for _, err, row in iter_jsonl(data):
        found = detect_task(row) if err is None else None
        if found:
            return found
        break
    raise DataError(f"{data}: cannot tell the task from the rows; give --task ({', '.join(TASKS)})")


def task_context(task: str, recipe, rows: list[Record]) -> dict:
    """Settings such as the label set come from the run's training file when it is at hand, so the
    prompts are the ones the model was trained on; otherwise from the evaluated file."""
    module = TASKS[task]
    if recipe is not None and recipe.data.task == task and Path(recipe.data.train).is_file():
        train_rows = [row for _, err, row in iter_jsonl(recipe.data.train) if err is None and isinstance(row, dict)]
        return module.context(train_rows)
    return module.context([r.data for r in rows])


def generate_batched(model, tokenizer, prompts: list[list[dict]], *, batch_size: int, max_new_tokens: int,
                     eos_ids: set[int], on_batch=None) -> list[str]:
    """Greedy replies to chat prompts, `batch_size` at a time (slmtune.generation.complete), in prompt order."""
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    replies = complete(model, tokenizer, encoded, params, batch_size=batch_size, eos_ids=set(eos_ids),
                       on_batch=on_batch)
    return [c.text.strip() for c in replies]


def loss_batches(tokenizer, examples: list[dict], fmt: str, *, max_length: int, system_prompt: str | None,
                 batch_size: int, max_target_tokens: int = LOSS_TARGET_TOKENS) -> list[list]:
    """Tokenized examples grouped by length into batches of at most `batch_size` examples and (beyond
    the first example) `max_target_tokens` target tokens, which bounds the logits tensor."""
    encoded = [encode(fmt, ex, tokenizer, max_length, system_prompt) for ex in examples]
    encoded = sorted((e for e in encoded if e.n_targets() > 0), key=len)
    batches: list[list] = []
    for example in encoded:
        if batches and len(batches[-1]) < batch_size and \
                sum(e.n_targets() for e in batches[-1]) + example.n_targets() <= max_target_tokens:
            batches[-1].append(example)
        else:
            batches.append([example])
    return batches


@torch.no_grad()
def loss_sums(model, tokenizer, batches: list[list], amp_dtype=None, on_batch=None) -> list[dict]:
    """Target-only loss of each batch, as in training: [{"loss_sum", "n_tokens"}]."""
    out = []
    for examples in batches:
        batch = collate([[e] for e in examples], tokenizer.pad_token_id, packed=False)
        out.append({"loss_sum": target_loss_sum(model, batch, amp_dtype).item(), "n_tokens": batch["n_targets"]})
        if on_batch is not None:
            on_batch()
    return out


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "inf"
    return value


def evaluate(
    target: str,
    data: str,
    *,
    task: str | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int | None = None,
    output: str | os.PathLike | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate `target` (a run directory or a model) on the task rows in `data` and write eval.json
    (into the run directory, or to `output`). `limit` keeps the first N rows."""
    start = time.perf_counter()
    if batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    if limit is not None and limit < 1:
        raise DataError("--limit must be at least 1")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise DataError("--max-new-tokens must be 0 or more")
    run_dir, recipe = run_recipe(target)
    task = resolve_task(task, recipe, data)
    module = TASKS[task]
    rows = read_records(data, task=task)[1]
    context = task_context(task, recipe, rows)
    if limit is not None:
        rows = rows[:limit]
    budget = module.MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    budget = budget if module.MAX_NEW_TOKENS > 0 else 0  # domain: nothing to generate
    system_prompt = recipe.data.system_prompt if recipe is not None else None
    max_length = recipe.data.max_length if recipe is not None else DEFAULT_MAX_LENGTH

    model, tokenizer = load_for_inference(target)
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    device = next(model.parameters()).device
    examples = [module.to_example(r.data, **context) for r in rows]

    prompts, references = [], []
    if budget > 0:
        for example in examples:
            prompt, reference = split_last_assistant(example["messages"])
            if system_prompt and (not prompt or prompt[0]["role"] != "system"):
                prompt = [{"role": "system", "content": system_prompt}] + prompt
            prompts.append(prompt)
            references.append(reference)
    planned = []
    if module.USES_LOSS:
        limit_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        planned = loss_batches(tokenizer, examples, module.FORMAT,
                               max_length=min(max_length, limit_positions or max_length),
                               system_prompt=system_prompt, batch_size=batch_size)
    n_batches = (math.ceil(len(prompts) / batch_size) if budget > 0 else 0) + len(planned)
    bar = None
    if progress:
        bar = tqdm(total=n_batches, desc=f"eval {task}", unit="batch", file=sys.stderr)
    tick = bar.update if bar is not None else None
    try:
        outputs = predictions = None
        if budget > 0:
            outputs = generate_batched(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=budget,
                                       eos_ids=sorted(end_of_turn_ids(model, tokenizer)), on_batch=tick)
            predictions = [module.parse(text, r.data, **context) for text, r in zip(outputs, rows)]
        losses = None
        if module.USES_LOSS:
            amp = autocast_dtype(recipe.train.precision if recipe is not None else "auto", device)
            losses = loss_sums(model, tokenizer, planned, amp_dtype=amp, on_batch=tick)
    finally:
        if bar is not None:
            bar.close()

    rows_data = [r.data for r in rows]
    metrics = module.score(predictions if predictions is not None else [None] * len(rows), rows_data, losses=losses)
    report = {
        "task": task,
        "target": str(target),
        "model": recipe.model.name if recipe is not None else str(target),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "data": str(data),
        "n_examples": len(rows),
        "limit": limit,
        "batch_size": batch_size,
        "max_new_tokens": budget,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - start, 3),
        "examples": [
            {"line": r.line, "prompt": p[-1]["content"] if p else "", "output": o, "prediction": pred,
             "reference": ref}
            for r, p, o, pred, ref in zip(rows, prompts, outputs or [], predictions or [], references)
        ],
    }
    report = _jsonable(report)
    path = Path(output) if output else (run_dir.eval_file if run_dir is not None else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return EvalResult(report, path)


def format_table(report: dict) -> str:
    """The metrics as an aligned two-column table; per-class / per-type F1 indented below."""
    rows: list[tuple[str, str]] = []
    for name, value in report["metrics"].items():
        if isinstance(value, dict):
            for sub, values in value.items():
                if isinstance(values, dict) and "f1" in values:
                    rows.append((f"  {name}[{sub}] f1", f"{values['f1']:.4f}  (support {values.get('support', '?')})"))
        elif isinstance(value, float):
            rows.append((name, f"{value:.4f}"))
        else:
            rows.append((name, str(value)))
    width = max([len("metric")] + [len(k) for k, _ in rows])
    lines = [f"{report['task']} on {report['data']} ({report['n_examples']} examples, {report['seconds']:.1f} s)",
             f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
