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
from slmtune.data.dataset import pairs_from_task_examples
from slmtune.data.formats import detect_format
from slmtune.data.tokenize import Pair, encode_pair
from slmtune.data.validate import read_records
from slmtune.scoring import DEFAULT_BATCH_SIZE, answer_rows, generate_batched, metric_interval
from slmtune.grader_sandbox import run_python
from slmtune.graders import check_grader, grade, item_fields
from slmtune.models import end_of_turn_ids
from slmtune.tasks import TASKS, detect_task
from slmtune.methods.peft_common import has_adapter, prompt_learning_config
from slmtune.training.judge import local_judge
from slmtune.training.loss import autocast_dtype, sequence_logprobs, target_loss_sum
from slmtune.training.objectives.preference import FedPair, collate_pairs
from slmtune.training.rundir import RunDir, load_base, load_for_inference

PAIR_SEED = 1234  # which other row's answer is the wrong one, the same for every model evaluated
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


def file_format(path: str) -> str | None:
    """The format of a file's first row (None when it does not parse)."""
    for _, err, row in iter_jsonl(path):
        return detect_format(row) if err is None else None
    return None


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


@torch.no_grad()
def preference_scores(model, tokenizer, pairs: list[Pair], *, reference_model=None, batch_size: int = 8,
                      amp_dtype=None, attention: str = "sdpa", on_batch=None) -> dict:
    """How `model` ranks each pair's two answers.

    win_rate: share of pairs whose preferred answer has the higher mean token log-probability (the
    model's own likelihood ordering, length-normalized). With a reference (the run's starting
    model: its adapter disabled, or the base model of a full fine-tune) also reward_accuracy, DPO's
    accuracy: share of pairs whose preferred answer gained more log-probability over the reference
    than the other, and the mean reward margin (beta 1)."""
    fed = [FedPair(p) for p in pairs]
    wins = correct = 0
    margins = 0.0
    for at in range(0, len(fed), batch_size):
        chunk = fed[at : at + batch_size]
        batch = collate_pairs([[f] for f in chunk], tokenizer.pad_token_id, attention)
        sums, counts = sequence_logprobs(model, batch, amp_dtype)
        means = sums / counts.clamp(min=1)
        wins += int((means[0::2] > means[1::2]).sum())
        if reference_model is not None:
            if reference_model is model:  # an adapter run: the reference is the model with its adapter off
                with model.disable_adapter():
                    ref = sequence_logprobs(model, batch, amp_dtype)[0]
            else:
                ref = sequence_logprobs(reference_model, batch, amp_dtype)[0]
            margin = (sums[0::2] - ref[0::2]) - (sums[1::2] - ref[1::2])
            correct += int((margin > 0).sum())
            margins += float(margin.sum())
        if on_batch is not None:
            on_batch()
    n = max(len(fed), 1)
    scores = {"pairs": len(fed), "win_rate": wins / n}
    if reference_model is not None:
        scores |= {"reward_accuracy": correct / n, "mean_margin": margins / n}
    return scores


def reference_for(model, recipe):
    """The model a run started from, to measure rewards against: the same model with its adapter
    off (adapter runs), or the base model (full fine-tuning); None for a plain model."""
    if recipe is None:
        return None
    if prompt_learning_config(model) is None and has_adapter(model):
        return model
    reference = load_base(recipe)
    reference.eval()
    return reference


def evaluate_preferences(target: str, data: str, *, limit: int | None, batch_size: int, progress: bool,
                         output: str | os.PathLike | None, start: float) -> EvalResult:
    """`slmtune eval` on a preference file: win rate (and, for a run, reward accuracy) on its pairs."""
    run_dir, recipe = run_recipe(target)
    records = read_records(data, fmt="preference")[1]
    if limit is not None:
        records = records[:limit]
    model, tokenizer = load_for_inference(target)
    system_prompt = recipe.data.system_prompt if recipe is not None else None
    max_length = recipe.data.max_length if recipe is not None else DEFAULT_MAX_LENGTH
    pairs = [encode_pair(r.data, tokenizer, system_prompt).truncated(max_length) for r in records]
    amp = autocast_dtype(recipe.train.precision if recipe is not None else "auto", next(model.parameters()).device)
    bar = tqdm(total=math.ceil(len(pairs) / batch_size), desc="eval preference", unit="batch",
               file=sys.stderr) if progress else None
    try:
        scores = preference_scores(model, tokenizer, pairs, reference_model=reference_for(model, recipe),
                                   batch_size=batch_size, amp_dtype=amp, on_batch=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    report = {"task": "preference", "target": str(target),
              "model": recipe.model.name if recipe is not None else str(target),
              "run_dir": str(run_dir) if run_dir is not None else None, "data": str(data),
              "n_examples": len(pairs), "limit": limit, "batch_size": batch_size, "metrics": scores,
              "seconds": round(time.perf_counter() - start, 3), "examples": []}
    return EvalResult(report, _write_report(report, output, run_dir))


def _write_report(report: dict, output, run_dir) -> Path | None:
    path = Path(output) if output else (run_dir.eval_file if run_dir is not None else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n")
    return path


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
    pairs: bool = False,
) -> EvalResult:
    """Evaluate `target` (a run directory or a model) on the task rows in `data` and write eval.json
    (into the run directory, or to `output`). `limit` keeps the first N rows. With `pairs`, also how
    the model ranks preference pairs built from the rows (the reference answer over another row's,
    slmtune.data.dataset.pairs_from_task_examples). A file of preference pairs is scored as such."""
    start = time.perf_counter()
    if batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    if limit is not None and limit < 1:
        raise DataError("--limit must be at least 1")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise DataError("--max-new-tokens must be 0 or more")
    if task is None and file_format(data) == "preference":
        return evaluate_preferences(target, data, limit=limit, batch_size=batch_size, progress=progress,
                                    output=output, start=start)
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
    planned = []
    if module.USES_LOSS:
        limit_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        planned = loss_batches(tokenizer, examples, module.FORMAT,
                               max_length=min(max_length, limit_positions or max_length),
                               system_prompt=system_prompt, batch_size=batch_size)
    n_batches = (math.ceil(len(rows) / batch_size) if budget > 0 else 0) + len(planned)
    bar = None
    if progress:
        bar = tqdm(total=n_batches, desc=f"eval {task}", unit="batch", file=sys.stderr)
    tick = bar.update if bar is not None else None
    try:
        answers = None
        if budget > 0:
            answers = answer_rows(model, tokenizer, task, [r.data for r in rows], context,
                                  system_prompt=system_prompt, batch_size=batch_size, max_new_tokens=budget,
                                  on_batch=tick)
        losses = None
        if module.USES_LOSS:
            amp = autocast_dtype(recipe.train.precision if recipe is not None else "auto", device)
            losses = loss_sums(model, tokenizer, planned, amp_dtype=amp, on_batch=tick)
    finally:
        if bar is not None:
            bar.close()

    rows_data = [r.data for r in rows]
    predictions = answers.predictions if answers is not None else [None] * len(rows)
    metrics = module.score(predictions, rows_data, losses=losses)
    interval = None
    # What the rows' number allows the headline metric. Loss metrics are not resampled: the losses are
    # per batch of the original rows, so a resample must not be scored with them.
    if answers is not None:
        interval = metric_interval(lambda p, r: module.score(p, r).get(module.METRIC),
                                   predictions, rows_data)
    if pairs:
        if module.FORMAT != "chat":
            raise DataError(f"--pairs: task {task} has no answers to pair (it trains on plain text)")
        pair_records = pairs_from_task_examples([Record(r.line, e) for r, e in zip(rows, examples)], PAIR_SEED, data)
        encoded = [encode_pair(r.data, tokenizer, system_prompt).truncated(max_length) for r in pair_records]
        amp = autocast_dtype(recipe.train.precision if recipe is not None else "auto", device)
        metrics["preference"] = preference_scores(model, tokenizer, encoded, amp_dtype=amp, batch_size=batch_size,
                                                  reference_model=reference_for(model, recipe))
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
        "interval": interval and {"metric": module.METRIC} | interval,
        "seconds": round(time.perf_counter() - start, 3),
        "examples": [
            {"line": r.line, "prompt": p[-1]["content"] if p else "", "output": o, "prediction": pred,
             "reference": ref}
            for r, p, o, pred, ref in zip(rows, answers.prompts, answers.outputs, answers.predictions,
                                          answers.references)
        ] if answers is not None else [],
    }
    report = _jsonable(report)
    return EvalResult(report, _write_report(report, output, run_dir))


def format_table(report: dict) -> str:
    """The metrics as an aligned two-column table; per-class / per-type F1 indented below."""
    rows: list[tuple[str, str]] = []
    for name, value in report["metrics"].items():
        if name == "preference" and isinstance(value, dict):
            rows += [(f"  pairs {k}", f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in value.items()]
        elif isinstance(value, dict):
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
    interval = report.get("interval")
    if interval:
        lines.append(f"{interval['metric']} {interval['level']:.0%} interval: {interval['low']:.4f} - "
                     f"{interval['high']:.4f} (bootstrap over the {report['n_examples']} rows, "
                     f"{interval['resamples']} resamples: what this many rows can tell apart)")
    return "\n".join(lines)


def grade_file(target: str, data: str, grader: dict, *, limit: int | None = None, max_new_tokens: int = 128,
               batch_size: int = DEFAULT_BATCH_SIZE, allow_python: bool = False, progress: bool = True) -> dict:
    """What OpenAI's /graders/run does, for a whole file: `target` (a model or run directory) answers
    every row's messages (greedy), `grader` scores each answer with the row as its item. Returns the
    mean reward, the error flags' counts and every graded sample. score_model graders ask `target`
    when they name it, else the model they name (loaded here)."""
    check_grader(grader, python_allowed=allow_python)
    rows = [record.data for record in read_records(data, grader_fields=item_fields(grader))[1]][:limit]
    model, tokenizer = load_for_inference(target)
    ask = local_judge({target: (model, tokenizer)})

    bar = tqdm(total=math.ceil(len(rows) / batch_size), desc="grade", unit="batch", file=sys.stderr) if progress else None
    try:
        answers = generate_batched(model, tokenizer, [row["messages"] for row in rows], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, eos_ids=sorted(end_of_turn_ids(model, tokenizer)),
                                   on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    samples, errors = [], {}
    for row, answer in zip(rows, answers):
        result = grade(grader, answer, row, ask=ask, run_python=run_python if allow_python else None)
        for flag, raised in result.errors.items():
            if raised is True:
                errors[flag] = errors.get(flag, 0) + 1
        samples.append({"prompt": row["messages"][-1]["content"], "answer": answer, "reward": result.reward,
                        "sub_rewards": result.sub_rewards, "errors": result.errors})
    rewards = [s["reward"] for s in samples]
    return {"target": target, "data": data, "grader": grader.get("name") or grader["type"], "n": len(samples),
            "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0, "errors": errors, "samples": samples}

