"""Hyperparameters of a job: "auto" or a number each, resolved from the dataset size, and the
recipe a job trains with.

The "auto" rule, for a training file of n examples:
    n_epochs                  ceil(500 / n) clamped to [3, 10]: about 500 example passes on small
                              datasets (7 epochs for 75 examples), 3 epochs from 167 examples on
    batch_size                1 if n < 16, 2 if n < 32, 4 if n < 1024, else 8
    learning_rate_multiplier  1.0 (the learning rate is the method's base rate times it:
                              1e-3 for lora / qlora / dora, 5e-5 for full)
Why these numbers: small datasets of facts must actually be learned. With 75 support
conversations about a fictional product (examples/support_assistant), this rule (7 epochs, batch 4,
LoRA at 1e-3, unpacked rows as jobs train) took SmolLM2-135M-Instruct from 0/15 to 14/15 facts on
paraphrased held-out questions (docs/benchmarks.md); the earlier 2e-4 x 3 epochs left them unlearned.
Explicit values must be integers n_epochs 1-50 and batch_size 1-256, and a number
0 < learning_rate_multiplier <= 10.
"""

from __future__ import annotations

import math

from slmtune.config import Recipe, recipe_from_dict
from slmtune.methods import METHODS, SERVICE_METHODS

# The learning rate "auto" trains each method with (learning_rate_multiplier 1).
BASE_LEARNING_RATE = {name: METHODS[name].auto_learning_rate for name in SERVICE_METHODS}
LIMITS = {"n_epochs": (1, 50), "batch_size": (1, 256)}
# DPO's "auto" (see the module docstring for the measurement behind it).
DPO_AUTO = {"beta": 0.1}
DPO_PAIR_PASSES = 360  # epochs: about this many pair passes, 2 to 10 epochs
DPO_LEARNING_RATE_SCALE = 1.0  # times the method's base rate


# The hyperparameters each OpenAI method type takes (method.<type>.hyperparameters).
HYPERPARAMETERS = {
    "supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
    "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"),
}
BETA_LIMITS = (0.0, 2.0)  # exclusive / inclusive bounds of an explicit DPO beta


class HyperparameterError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def auto_values(n_examples: int, method_type: str = "supervised") -> dict:
    """What "auto" means for each hyperparameter of `method_type`, for a file of n examples (pairs)."""
    n = max(1, n_examples)
    batch = 1 if n < 16 else 2 if n < 32 else 4 if n < 1024 else 8
    values = {"n_epochs": min(10, max(3, math.ceil(500 / n))), "batch_size": batch, "learning_rate_multiplier": 1.0}
    if method_type == "dpo":
        values |= DPO_AUTO | {"n_epochs": min(10, max(2, math.ceil(DPO_PAIR_PASSES / n)))}
    return values


def resolve(requested: dict, n_examples: int, method_type: str = "supervised") -> dict:
    """Numbers for every hyperparameter; raises HyperparameterError naming the bad one."""
    auto = auto_values(n_examples, method_type)
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
        if value == "auto" or value is None:
            out[name] = auto[name]
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HyperparameterError(param, f"{name} must be \"auto\" or a finite number, got {value!r}")
        if name in LIMITS:
            lo, hi = LIMITS[name]
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
            if not 0 < value <= 10:
                raise HyperparameterError(param, f"{name} must be \"auto\" or a number in (0, 10], got {value!r}")
            out[name] = float(value)
    return out


def build_recipe(*, base: str, method: str, train_path: str, validation_path: str | None, resolved: dict,
                 seed: int, run_dir: str, n_examples: int, save_every: int, threads: int | None,
                 method_type: str = "supervised") -> Recipe:
    """The recipe of a job (raises RecipeError if it is not valid). Rows are not packed, so an epoch
    is exactly ceil(n_examples / batch_size) steps and `save_every: 0` means one checkpoint per epoch.
    A dpo job's batch is pairs; its reference is the model with its adapter disabled (or, for full
    fine-tuning, the starting weights' log-probabilities precomputed once)."""
    per_epoch = math.ceil(n_examples / resolved["batch_size"])
    data = {"train": train_path} | ({"validation": validation_path} if validation_path else {})
    rate = METHODS[method].auto_learning_rate * (DPO_LEARNING_RATE_SCALE if method_type == "dpo" else 1.0)
    train = {
        "epochs": resolved["n_epochs"], "micro_batch_size": resolved["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": rate * resolved["learning_rate_multiplier"],
        "seed": seed, "packing": False, "save_every": save_every or per_epoch, "keep_checkpoints": 3,
    } | ({"num_threads": threads} if threads else {})
    if method_type == "dpo":
        train["objective"] = {"name": "dpo", "beta": resolved["beta"]}
    return recipe_from_dict({"model": {"name": base}, "method": {"name": method}, "data": data, "train": train,
                             "output": {"dir": run_dir, "overwrite": True}}, "job")
