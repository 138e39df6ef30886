"""`run(recipe)`: the one fine-tuning pipeline. The CLI and the service worker both call it.

    from slmtune.config import load_recipe
    from slmtune.training.run import run
    result = run(load_recipe("recipes/quickstart/support_assistant.yaml"))

It reads top to bottom: the run directory (training/rundir.py owns its layout), the model and
tokenizer, the data, the method, the loop (training/loop.py), the result and summary.json. Events
(training/events.py) go to metrics.jsonl and to `on_event` (the CLI prints them with --json-events).
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slmtune import auto
from slmtune.config import Recipe, RecipeError
from slmtune.data.dataset import build_datasets
from slmtune.graders import item_fields
from slmtune.methods import METHODS, Method
from slmtune.methods.peft_common import skip_adapter_input_upcast
from slmtune.models import load_model, load_tokenizer
from slmtune.scoring import score_rows
from slmtune.tasks import TASKS
from slmtune.training import distributed, events
from slmtune.training.loop import TrainState, checkpoint_state, peak_rss_mb, train, write_trained
from slmtune.training.loss import autocast_dtype
from slmtune.training.objectives import OBJECTIVES
from slmtune.training.rundir import RunDir, RunDirError
from slmtune.training.tracking import Trackers


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def run(
    recipe: Recipe,
    *,
    resume: bool = False,
    on_event: events.EventSink | None = None,
    progress: bool = True,
) -> RunResult:
    """Fine-tune as the recipe says and write the run directory. Raises RecipeError, DataError,
    ModelError or TemplateError with a message meant for the user.

    Under torchrun (`slmtune train --nproc N`) every process calls run(): they train together as
    train.distributed says, and rank 0 alone writes files, prints and calls `on_event`."""
    recipe = recipe.model_copy(update={"train": recipe.train.resolved(accelerator=torch.cuda.is_available())})
    par = distributed.start(recipe.train)
    try:
        result = _run(recipe, par, resume=resume, on_event=on_event if par.is_main else None,
                      progress=progress and par.is_main)
    except BaseException:
        par.shutdown(clean=False)
        raise
    par.shutdown()
    return result


def resolve_frozen_dtype(recipe: Recipe, method: Method, device, *, quantized: bool) -> str:
    """The dtype the base model is loaded in (model.frozen_dtype)."""
    if recipe.model.frozen_dtype != "auto":
        return recipe.model.frozen_dtype
    # GRPO spends most of a step sampling answers: decoding a few dozen rows through bf16 weights ran
    # 3.4x slower than through fp32 ones on a CPU (SmolLM2-135M + LoRA, 32 rows x 30 tokens, Xeon
    # with AMX: 31 s against 9 s; oneDNN's bf16 path pays off only for larger matrices), so its base stays fp32.
    sampling = recipe.train.objective.name == "grpo" and device.type == "cpu"
    return frozen_base_dtype(method, recipe.method, quantized=quantized, sampling=sampling,
                             bf16=autocast_dtype(recipe.train.precision, device) is not None,
                             sharded=recipe.train.distributed.strategy not in ("none", "ddp"))


def frozen_base_dtype(method: Method, method_cfg, *, quantized: bool, bf16: bool, sharded: bool = False,
                      sampling: bool = False) -> str:
    """model.frozen_dtype "auto": bfloat16 for the frozen base of an adapter method computing in bf16.
    Also what `slmtune plan --measure` loads, so the planner is fitted on what runs."""
    # A frozen base needs no fp32 master copy: under bf16 autocast its matmuls read bf16 weights
    # anyway, and a bf16 residual stream keeps smaller activations for backward (SmolLM2-135M: 0.90x
    # peak RSS, 1.04x tokens/s; docs/benchmarks.md). Adapters stay fp32 (PEFT upcasts them).
    # Sharded strategies flatten parameters of one dtype, so they keep fp32; QLoRA's base is
    # quantized already.
    # PiSSA/OLoRA move the top singular directions into the adapter and keep the residual in the base:
    # that residual is trained against, so it keeps full precision.
    frozen_base = (method.artifact == "adapter" and not quantized and not method.rewrites_base(method_cfg)
                   and not sampling)
    return "bfloat16" if frozen_base and bf16 and not sharded else "float32"


def start_from_adapter(model, method: Method, adapter: str) -> None:
    """Load a finished run's adapter (or a PEFT adapter directory) into the freshly prepared model."""
    path = RunDir(adapter).artifact() if RunDir.holds_run(adapter) else Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise RunDirError(f"model.adapter {adapter}: neither a finished run with an adapter/ nor a PEFT adapter "
                          "directory (adapter_config.json)")
    try:
        method.load_trained(model, path)
    except (RuntimeError, ValueError, KeyError) as err:
        raise RecipeError(f"model.adapter {adapter}: does not fit this recipe's method settings (rank, target "
                          f"modules); set method to the adapter's: {str(err)[:300]}") from None


def _run(recipe: Recipe, par, *, resume: bool, on_event: events.EventSink | None, progress: bool) -> RunResult:
    wall_start = time.perf_counter()
    run_dir = RunDir(recipe.output.dir)
    checkpoint = run_dir.prepare(resume=resume, overwrite=recipe.output.overwrite, parallel=par)
    cfg = recipe.train
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    method = METHODS[recipe.method.name]
    load_kwargs = method.load_kwargs(recipe.method)
    if torch.cuda.is_available() and load_kwargs:
        load_kwargs["device_map"] = {"": par.device.index or 0}  # quantized weights are placed while loading
    tokenizer = load_tokenizer(recipe.model.name)
    frozen_dtype = resolve_frozen_dtype(recipe, method, par.device, quantized=bool(load_kwargs))
    attention = recipe.model.attn_implementation
    model = load_model(recipe.model.name, attn_implementation="eager" if attention == "eager" else "sdpa",
                       dtype=frozen_dtype, **load_kwargs)
    if torch.cuda.is_available() and not load_kwargs:
        model.to(par.device)
    objective = OBJECTIVES[cfg.objective.name]
    if cfg.objective.name == "grpo" and par.world_size > 1:
        raise RecipeError("train.objective grpo trains in one process (sampling split across processes is not "
                          "built yet); run it without --nproc/--nnodes")
    # Reinforcement rows must hold every field the grader reads ({{item.field}}).
    rft = objective.formats == ("reinforcement",)
    data = build_datasets(recipe.data, tokenizer, cfg.seed, pairs=objective.formats == ("preference",),
                          grader_fields=item_fields(cfg.objective.grader) if rft else None)
    if data.format not in objective.formats:
        wanted = " or ".join(objective.formats)
        hint = {"preference": "train.objective dpo or orpo",
                "reinforcement": "train.objective grpo with a grader (slmtune train --grader GRADER.json)"}.get(
            data.format, "train.objective sft")
        raise RecipeError(f"{recipe.data.train}: {data.format} data, but train.objective {objective.name} learns "
                          f"from {wanted} data; use {hint}, or a {wanted} file")
    # "auto" values resolved from the data (slmtune/auto.py), saved as the run's recipe.yaml.
    cfg = cfg.resolved_for_data(data.n_examples, recipe.method.name, data.n_target_tokens,
                                 data.held_out)
    recipe = recipe.model_copy(update={"train": cfg})
    if par.is_main:
        run_dir.write_recipe(recipe)
        if data.held_out and progress:
            print(f"held out {data.held_out} of {data.n_examples} training examples for validation (seeded; "
                  "data.validation_split: 0 trains on all)", file=sys.stderr, flush=True)

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        model = method.prepare(model, recipe.method)
    except ValueError as err:
        raise RecipeError(f"method {recipe.method.name}: {err}") from None
    if recipe.model.adapter:
        start_from_adapter(model, method, recipe.model.adapter)
    if autocast_dtype(cfg.precision, par.device) is not None:
        skip_adapter_input_upcast(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    feed = objective.make_feed(data, recipe, tokenizer, model, par)
    loss = objective.loss_module(model, recipe, feed)
    if cfg.select_by == "metric" and par.world_size > 1:
        # Every process would answer every validation row and decide "best" and early stopping alone.
        raise RecipeError("train.select_by metric scores answers in one process; run it without --nproc/--nnodes "
                          "or use select_by loss")
    if cfg.select_by == "metric" and not data.validation_rows and par.is_main:
        print("warning: train.select_by metric: no validation rows (no validation file, and too few examples to "
              "hold some out), so the result is the last step's weights", file=sys.stderr, flush=True)
    if cfg.select_by == "metric" and data.validation_rows:
        # The best evaluation by the task's metric of greedy answers, scored as `slmtune eval` scores.
        amp = autocast_dtype(cfg.precision, par.device)
        scored = data.validation_rows
        if len(scored) > auto.SCORED_VALIDATION_ROWS:
            # Each evaluation generates an answer per row: a large validation file would cost more
            # than the training. The same seeded sample every time, so evaluations compare.
            scored = random.Random(cfg.seed).sample(scored, auto.SCORED_VALIDATION_ROWS)
            if par.is_main and progress:
                print(f"train.select_by metric scores a seeded {len(scored)} of the {len(data.validation_rows)} "
                      "validation rows at each evaluation", file=sys.stderr, flush=True)
        feed.score_task = lambda: score_rows(model, tokenizer, recipe.data.task, scored,
                                             data.task_context, system_prompt=recipe.data.system_prompt,
                                             amp_dtype=amp)
        feed.selection_metric = TASKS[recipe.data.task].METRIC

    resume_step = (checkpoint_state(checkpoint).step if checkpoint else 0) if resume else None
    metrics = run_dir.open_metrics(resume_step) if par.is_main else None

    # Trackers start before training so that a missing library or an unreachable server fails now.
    trackers = (Trackers(cfg.report_to, run_dir.path, recipe.model_dump(mode="json"), cfg.tracking)
                if par.is_main and cfg.report_to else None)

    def emit(event: events.Event) -> None:
        if metrics is None:  # ranks other than 0 report nothing
            return
        metrics(event)
        if trackers is not None:
            trackers.log(event)
        if isinstance(event, events.Eval) and progress:
            reward = f", reward {event.metrics['reward']:.4f}" if "reward" in event.metrics else ""
            tqdm.write(f"step {event.step}: eval_loss {event.eval_loss:.4f}{reward}", file=sys.stderr)
        if on_event is not None:
            on_event(event)

    if progress:
        print(f"{len(data.train)} training examples ({data.format}), {len(data.validation)} validation; "
              f"{feed.n_rows} rows ({'packed' if feed.packed else 'unpacked'}); objective {objective.name}; "
              f"trainable parameters "
              f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)", file=sys.stderr, flush=True)
    try:
        state: TrainState = train(
            model, method, feed, loss, cfg, run_dir=run_dir, resume_from=checkpoint, emit=emit, progress=progress,
            progress_metrics=objective.progress_metrics, parallel=par,
        )
    except BaseException:
        if trackers is not None:
            trackers.finish(None, [])
        raise
    finally:
        if metrics is not None:
            metrics.close()

    # The result: the weights of the best evaluation (train.select_best), else the last step's.
    best = run_dir.checkpoint(state.best_step) if cfg.select_best and state.best_step not in (None, state.step) else None
    # Sharded weights (FSDP, ZeRO-3) are gathered; rank 0 writes the usual one-process format.
    weights = par.trained_state_dict(model, trainable_only=method.artifact == "adapter")
    if best is not None and weights is None:
        method.load_trained(model, best / method.artifact)  # then saved as a result, like the last step's
    if par.is_main:
        with run_dir.writing_artifact(method.artifact) as tmp:
            if best is not None and weights is not None:
                # Sharded weights are not reloaded into the wrapped model: the checkpoint's copy is the result.
                shutil.copytree(best / method.artifact, tmp, dirs_exist_ok=True)
            else:
                write_trained(method, model, tmp, weights, final=True)
            if method.artifact == "model":
                tokenizer.save_pretrained(tmp)  # a complete, standalone model directory
    summary = {
        "model": recipe.model.name,
        "method": recipe.method.name,
        "objective": objective.name,
        "steps": state.step,
        "train_examples": len(data.train),
        "validation_examples": len(data.validation),
        "packed": feed.packed,
        "train_tokens": state.train_tokens,
        "target_tokens": state.target_tokens,
        "train_seconds": round(state.train_seconds, 3),
        "loop_seconds": round(state.loop_seconds, 3),
        "tokens_per_second": round(state.train_tokens / state.train_seconds, 1) if state.train_seconds else None,
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "final_train_loss": state.last_loss,
        # The result's validation loss: the best evaluation's when train.select_best kept it.
        "eval_loss": state.best_eval_loss if best is not None else state.last_eval_loss,
        "eval_metrics": (state.best_eval_metrics if best is not None else state.last_eval_metrics) or {},
        "last_eval_loss": state.last_eval_loss,
        "best_step": state.best_step if cfg.select_best and state.best_step is not None else None,
        "selected_by": state.selected_by if cfg.select_best and state.best_step is not None else None,
        "result_step": state.best_step if best is not None else state.step,
        "stopped_early": state.stopped_early,
        "planned_steps": state.planned_steps,
        "held_out_examples": data.held_out,
        "trainable_params": trainable,
        "total_params": total,
        "threads": torch.get_num_threads(),
        "frozen_dtype": frozen_dtype,
        "strategy": par.strategy,
        "offload": par.offload,
        "world_size": par.world_size,
        "state_bytes_per_rank": state.state_bytes_per_rank,
    }
    if par.is_main:
        run_dir.write_summary(summary)
    if trackers is not None:
        for problem in trackers.finish(summary, [run_dir.recipe_file, run_dir.summary_file, run_dir.artifact()]):
            print(f"warning: tracking: {problem}", file=sys.stderr)
    if on_event is not None:
        on_event(events.End(summary))
    return RunResult(run_dir.path, summary)
