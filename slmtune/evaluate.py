"""`slmtune eval`: score a base model or a fine-tuned run on task data.

    slmtune eval runs/ner --data ../shared/data/ner/test.jsonl --limit 200
    slmtune eval smollm2-135m-instruct --data test.jsonl --task qa --output runs/base-qa.json

Rows are turned into prompts by the task's template (slmtune/tasks/<task>.py), exactly as in
training; the model answers with batched greedy decoding (left padding, KV cache, logits of the
last position only); the task parses each answer and scores the predictions. Tasks measured by
loss (domain: perplexity; chat: validation loss, besides ROUGE-L of generated replies) use the
target-only loss of training (`slmtune.training.loop.target_loss_sum`).

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

from slmtune.data.formats import DataError, Record, iter_jsonl
from slmtune.tasks import TASKS, detect_task
from slmtune.tasks.common import split_last_assistant

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 1024  # tokens per example for loss-based metrics when no recipe says otherwise
LOSS_TARGET_TOKENS = 4096  # target tokens per loss batch: bounds the (tokens x vocabulary) logits


@dataclass
class EvalResult:
    report: dict
    path: Path | None


def _run_recipe(target: str):
    run_dir = Path(target)
    if (run_dir / "recipe.yaml").is_file():
        from slmtune.config import load_recipe

        return run_dir, load_recipe(run_dir / "recipe.yaml")
    return None, None


def read_rows(path: str, task: str) -> list[Record]:
    """The file's rows after the task's validation; problems raise DataError naming file:line."""
    from slmtune.data.validate import validate_file

    report = validate_file(path, task=task, min_examples=1)
    if report.errors:
        shown = "\n".join(str(issue) for issue in report.errors[:20])
        more = f"\n... and {len(report.errors) - 20} more" if len(report.errors) > 20 else ""
        raise DataError(f"{path}: {len(report.errors)} problem(s); run `slmtune data validate {path} --task {task}`"
                        f"\n{shown}{more}")
    return [Record(line, data) for line, err, data in iter_jsonl(path) if err is None]


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


def _clean(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: list[list[dict]], *, batch_size: int, max_new_tokens: int,
                     eos_ids: list[int], on_batch=None) -> list[str]:
    """Greedy replies to chat prompts, `batch_size` at a time: left padding so every row's next token
    is in the last column, KV cache, and (as `generate` does) logits for the last position only.
    Prompts are grouped by length to waste little on padding; replies come back in prompt order."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoded = [tokenizer(tokenizer.apply_chat_template(_clean(p), tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    replies: list[str] = [""] * len(encoded)
    for at in range(0, len(order), batch_size):
        chunk = order[at : at + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = encoded[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, use_cache=True, eos_token_id=eos_ids, pad_token_id=pad_id,
            temperature=None, top_p=None, top_k=None,
        )
        for row, i in enumerate(chunk):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch()
    return replies


def loss_batches(tokenizer, examples: list[dict], fmt: str, *, max_length: int, system_prompt: str | None,
                 batch_size: int, max_target_tokens: int = LOSS_TARGET_TOKENS) -> list[list]:
    """Tokenized examples grouped by length into batches of at most `batch_size` examples and (beyond
    the first example) `max_target_tokens` target tokens, which bounds the logits tensor."""
    from slmtune.data.tokenize import encode

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
    from slmtune.data.batching import collate
    from slmtune.training.loss import target_loss_sum

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
    from slmtune.chat import load_for_inference
    from slmtune.models import end_of_turn_ids
    from slmtune.training.loss import autocast_dtype

    start = time.perf_counter()
    if batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    if limit is not None and limit < 1:
        raise DataError("--limit must be at least 1")
    if max_new_tokens is not None and max_new_tokens < 0:
        raise DataError("--max-new-tokens must be 0 or more")
    run_dir, recipe = _run_recipe(target)
    task = resolve_task(task, recipe, data)
    module = TASKS[task]
    rows = read_rows(data, task)
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
        from tqdm.auto import tqdm

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
    path = Path(output) if output else (run_dir / "eval.json" if run_dir is not None else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
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
