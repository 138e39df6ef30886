"""Hyperparameters of a job: "auto" or a number each, resolved from the dataset size, and the
recipe a job trains with.

"auto" is the one rule of slmtune/auto.py (epochs, learning rate, batch size from the number of
examples, the method and the objective), which recipes and `slmtune train` use too, so a job and a
CLI run on the same file resolve the same values (tests/test_auto.py). Explicit values must be
integers n_epochs 1-50 and batch_size 1-256, a number 0 < learning_rate_multiplier <= 10, for
DPO a beta in (0, 2], for reinforcement integers eval_interval and eval_samples, a number
0 < compute_multiplier <= 4 (answers per prompt: 8 x it, at least 2), batch_size at most 64 prompts,
eval_samples at most 256 and reasoning_effort
(accepted, ignored: these models do not reason before answering).
"""

from __future__ import annotations

import collections
import math
import threading

from jinja2 import TemplateError

from slmtune import auto
from slmtune.config import DataSection, Precision, Recipe, recipe_from_dict
from slmtune.data.dataset import CountTooSlow, count_target_tokens
from slmtune.data.formats import DataError
from slmtune.methods import SERVICE_METHODS
from slmtune.models import load_tokenizer

LIMITS = {"n_epochs": (1, 50), "batch_size": (1, 256), "eval_interval": (1, 100_000), "eval_samples": (1, 256)}
# A reinforcement step samples batch_size x 8 x compute_multiplier answers: bounded so that one
# tenant's job cannot take a shared worker for days (64 prompts x 32 answers = 2,048 answers a step).
REINFORCEMENT_LIMITS = {"batch_size": (1, 64)}
MAX_COMPUTE_MULTIPLIER = 4.0
# Accepted as OpenAI documents it and ignored: the models trained here do not reason before answering.
REASONING_EFFORTS = ("default", "low", "medium", "high")
# The learning rate "auto" trains each method with (learning_rate_multiplier 1), for the console.
BASE_LEARNING_RATE = {name: auto.learning_rate(name) for name in SERVICE_METHODS}


# The hyperparameters each OpenAI method type takes (method.<type>.hyperparameters).
HYPERPARAMETERS = {
    "supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
    "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"),
    "reinforcement": ("n_epochs", "batch_size", "learning_rate_multiplier", "eval_interval", "eval_samples",
                      "compute_multiplier", "reasoning_effort"),
}
OBJECTIVE_OF = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
BETA_LIMITS = (0.0, 2.0)  # exclusive / inclusive bounds of an explicit DPO beta


class HyperparameterError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def held_out_rows(n_examples: int, validation_file: bool) -> int:
    """The rows of a job's training file run() holds out for validation: none with a validation file."""
    return 0 if validation_file else auto.held_out(n_examples)


def auto_values(n_examples: int, method_type: str = "supervised", target_tokens: int | None = None, *,
                validation_file: bool = False) -> dict:
    """What "auto" means for each hyperparameter of `method_type`, for a file of n examples (pairs)
    whose answers hold `target_tokens` tokens (supervised: target_tokens_of); without a validation
    file, run() holds some of them out."""
    objective = OBJECTIVE_OF[method_type]
    held_out = held_out_rows(n_examples, validation_file)
    values = {"n_epochs": auto.epochs(n_examples, objective, target_tokens, held_out),
              "batch_size": auto.batch_size(n_examples),
              "learning_rate_multiplier": 1.0}
    if method_type == "dpo":
        values["beta"] = auto.DPO_BETA
    if method_type == "reinforcement":
        values |= {"batch_size": auto.GRPO_PROMPTS_PER_STEP, "eval_samples": auto.GRPO_EVAL_SAMPLES,
                   "compute_multiplier": 1.0, "reasoning_effort": "default"}
    return values


def resolve(requested: dict, n_examples: int, method_type: str = "supervised",
            target_tokens: int | None = None, *, validation_file: bool = False) -> dict:
    """Numbers for every hyperparameter; raises HyperparameterError naming the bad one."""
    defaults = auto_values(n_examples, method_type, target_tokens, validation_file=validation_file)
    names = HYPERPARAMETERS[method_type]
    prefix = f"method.{method_type}.hyperparameters"
    unknown = set(requested) - set(names)
    if unknown:
        name = sorted(unknown)[0]
        raise HyperparameterError(f"{prefix}.{name}", f"Unknown hyperparameter `{name}`; expected "
                                                      f"{', '.join(names)}")
    out = {}
    for name in names:
        value = requested.get(name, "auto")
        param = f"{prefix}.{name}"
        if name == "eval_interval" and value in ("auto", None):
            continue  # from the step count, below
        if value == "auto" or value is None:
            out[name] = defaults[name]
            continue
        if name == "reasoning_effort":
            if value not in REASONING_EFFORTS:
                raise HyperparameterError(param, f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                                                 f"got {value!r}")
            out[name] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HyperparameterError(param, f"{name} must be \"auto\" or a finite number, got {value!r}")
        if name in LIMITS:
            lo, hi = (REINFORCEMENT_LIMITS if method_type == "reinforcement" else LIMITS).get(name, LIMITS[name])
            if float(value) != int(value) or not lo <= value <= hi:
                raise HyperparameterError(param, f"{name} must be \"auto\" or an integer from {lo} to {hi}, "
                                                 f"got {value!r}")
            out[name] = int(value)
        elif name == "beta":
            lo, hi = BETA_LIMITS
            if not lo < value <= hi:
                raise HyperparameterError(param, f"beta must be \"auto\" or a number in ({lo:g}, {hi:g}], got {value!r}")
            out[name] = float(value)
        else:
            hi = MAX_COMPUTE_MULTIPLIER if name == "compute_multiplier" else 10
            if not 0 < value <= hi:
                raise HyperparameterError(param, f"{name} must be \"auto\" or a number in (0, {hi:g}], got {value!r}")
            out[name] = float(value)
    if "eval_interval" in names and "eval_interval" not in out:
        out["eval_interval"] = auto.eval_every(steps_of(out, n_examples, validation_file=False))
    return out


def steps_of(resolved: dict, n_examples: int, *, validation_file: bool) -> int:
    """A job's optimizer steps: batches of `batch_size` examples (prompts, pairs) per epoch, over the
    examples left after run() holds some out for validation (none when a validation file is given)."""
    trained = n_examples - held_out_rows(n_examples, validation_file)
    return math.ceil(trained / resolved["batch_size"]) * resolved["n_epochs"]


def job_data(train_path: str, validation_path: str | None) -> dict:
    """The data section of a job's recipe: its files; every other setting is the recipes' default."""
    return {"train": train_path} | ({"validation": validation_path} if validation_path else {})


def target_tokens_of(base: str, train_path: str, n_examples: int, *, validation_file: bool = False,
                     time_limit: float | None = None) -> int:
    """The answer tokens a supervised job on `train_path` (of `n_examples` rows) trains on, counted
    as run() counts them (Datasets.n_target_tokens with the base model's tokenizer; the job's data
    section), so that "auto" epochs match `slmtune train` on the same file. Counting stops at
    auto.tokens_enough (the rule no longer looks beyond it; a number of rows that small answers
    reach quickly), or at the first row boundary after `time_limit` seconds (CountTooSlow: files
    whose answers are mostly cut or weighted 0 could take long). Uploaded files never change, so a
    count, or a row that cannot be counted, is remembered per (model, file, stopping point) in this
    process (COUNTS_KEPT of them; a timeout is not: it depends on the load), and simultaneous
    requests for one file wait for one count while other files' requests go on. Raises DataError
    naming the file's path (callers put the file's id in its place), or ModelError when the base
    model cannot be loaded."""
    held_out = held_out_rows(n_examples, validation_file)
    key = (base, train_path, auto.tokens_enough(n_examples, held_out), time_limit)
    with _counts_guard:
        counted = _counts.get(key)
        file_lock = _counting.setdefault(key, threading.Lock()) if counted is None else None
    if counted is None:
        with file_lock:
            with _counts_guard:
                counted = _counts.get(key)
            try:
                if counted is None:
                    counted = count_once(*key)
                    with _counts_guard:
                        _counts[key] = counted
                        while len(_counts) > COUNTS_KEPT:
                            _counts.popitem(last=False)
            finally:
                with _counts_guard:
                    _counting.pop(key, None)
    with _counts_guard:
        if key in _counts:
            _counts.move_to_end(key)
    if isinstance(counted, str):
        raise DataError(counted)  # a fresh exception: a kept one would pile up tracebacks
    return counted


COUNTS_KEPT = 256
_counts: collections.OrderedDict[tuple, int | str] = collections.OrderedDict()  # least recently used first
_counting: dict[tuple, threading.Lock] = {}  # a lock per file being counted
_counts_guard = threading.Lock()  # guards the two dicts (held for dict operations only, never a count)


def count_once(base: str, train_path: str, enough: int, time_limit: float | None) -> int | str:
    """target_tokens_of's count, or the message of the DataError a row raises (kept as well: a
    tenant re-posting a file that cannot be counted costs nothing the second time; only the message
    is kept, not the rows the failed count had read). CountTooSlow and ModelError propagate."""
    tokenizer = load_tokenizer(base)
    # validation_split 0: the count covers every row anyway, and no share of a file too small for
    # a split can fail it
    data = DataSection(**job_data(train_path, None), validation_split=0)
    try:
        return count_target_tokens(data, tokenizer, enough, time_limit)
    except CountTooSlow:
        raise
    except DataError as err:
        return str(err)
    except (TemplateError, ValueError, TypeError, KeyError) as err:  # the template refused a row (its tools)
        return f"{train_path}: the model's chat template cannot render a row: {str(err)[:300]}"
    except RecursionError:  # a row nested deeper than the template (or JSON encoder) can walk
        return f"{train_path}: a row is nested too deeply to render with the model's chat template"


def tokens_counted_in_full(target_tokens: int, n_examples: int, *, validation_file: bool = False) -> bool:
    """Whether target_tokens_of counted the whole file (False: it stopped at auto.tokens_enough, and
    the file holds at least that many)."""
    held_out = held_out_rows(n_examples, validation_file)
    return target_tokens < auto.tokens_enough(n_examples, held_out)


def tokens_text(target_tokens: int, n_examples: int, *, validation_file: bool = False) -> str:
    """"1476", or "at least 4002" when counting stopped early (for events and messages)."""
    full = tokens_counted_in_full(target_tokens, n_examples, validation_file=validation_file)
    return f"{target_tokens}" if full else f"at least {target_tokens}"


def build_recipe(*, base: str, method: str, train_path: str, validation_path: str | None, resolved: dict,
                 seed: int, run_dir: str, n_examples: int, save_every: int, threads: int | None,
                 precision: Precision = "auto",
                 method_type: str = "supervised", integrations: list[dict] | None = None,
                 mlflow_tracking_uri: str | None = None, grader: dict | None = None,
                 models: dict[str, str] | None = None) -> Recipe:
    """The recipe of a job (raises RecipeError if it is not valid). Rows are not packed, so an epoch
    is exactly ceil(n_examples / batch_size) steps and `save_every: 0` means one checkpoint per epoch.
    A dpo job's batch is pairs; its reference is the model with its adapter disabled (or, for full
    fine-tuning, the starting weights' log-probabilities precomputed once). A reinforcement job's
    batch is prompts, each answered compute_multiplier x 8 times, and `grader` scores the answers
    (its score_model graders name a model of `models`, the service's name -> path)."""
    per_epoch = steps_of(resolved | {"n_epochs": 1}, n_examples, validation_file=bool(validation_path))
    data = job_data(train_path, validation_path)
    rate = auto.learning_rate(method, OBJECTIVE_OF[method_type])
    train = {
        "epochs": resolved["n_epochs"], "micro_batch_size": resolved["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": rate * resolved["learning_rate_multiplier"],
        "seed": seed, "packing": False, "save_every": save_every or per_epoch, "keep_checkpoints": 3,
        "precision": precision,
    } | ({"num_threads": threads} if threads else {})
    if method_type == "dpo":
        train["objective"] = {"name": "dpo", "beta": resolved["beta"]}
    if method_type == "reinforcement":
        generations = min(64, max(2, round(auto.GRPO_GENERATIONS * resolved["compute_multiplier"])))
        train |= {"micro_batch_size": "auto", "eval_every": resolved["eval_interval"]}
        # create_job refused python graders unless the operator allows them (settings.allow_python_graders).
        train["objective"] = {"name": "grpo", "grader": local_grader(grader, models or {}), "allow_python_grader": True,
                              "prompts_per_step": resolved["batch_size"], "num_generations": generations,
                              "eval_samples": resolved["eval_samples"]}
    if integrations:
        train |= tracking_of(integrations, mlflow_tracking_uri)
    return recipe_from_dict({"model": {"name": base}, "method": {"name": method}, "data": data, "train": train,
                             "output": {"dir": run_dir, "overwrite": True}}, "job")


def local_grader(grader: dict, models: dict[str, str]) -> dict:
    """The grader as training runs it: score_model graders name the service's model by its path."""
    if grader["type"] == "score_model":
        return grader | {"model": models.get(grader["model"], grader["model"])}
    if grader["type"] == "multi":
        return grader | {"graders": {k: local_grader(g, models) for k, g in grader["graders"].items()}}
    return grader


def tracking_of(integrations: list[dict], mlflow_tracking_uri: str | None) -> dict:
    """A job's `integrations` as the recipe's train.report_to and train.tracking. One tracking section
    serves both backends: the W&B integration's run name and tags come first, MLflow's fill in."""
    by_type = {i["type"]: i[i["type"]] for i in integrations}
    wandb, mlflow = by_type.get("wandb") or {}, by_type.get("mlflow") or {}
    tracking = {
        "project": wandb.get("project"),
        "experiment": mlflow.get("experiment"),
        "name": wandb.get("name") or mlflow.get("name"),
        "entity": wandb.get("entity"),
        "tags": list(dict.fromkeys((wandb.get("tags") or []) + (mlflow.get("tags") or []))),
    }
    if "mlflow" in by_type and mlflow_tracking_uri:
        tracking["tracking_uri"] = mlflow_tracking_uri
    return {"report_to": list(by_type), "tracking": {k: v for k, v in tracking.items() if v}}
