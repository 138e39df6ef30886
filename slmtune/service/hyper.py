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


class HyperparameterError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def auto_values(n_examples: int) -> dict:
    n = max(1, n_examples)
    batch = 1 if n < 16 else 2 if n < 32 else 4 if n < 1024 else 8
    return {"n_epochs": min(10, max(3, math.ceil(500 / n))), "batch_size": batch, "learning_rate_multiplier": 1.0}


def resolve(requested: dict, n_examples: int) -> dict:
    """Numbers for every hyperparameter; raises HyperparameterError naming the bad one."""
    auto = auto_values(n_examples)
    unknown = set(requested) - set(auto)
    if unknown:
        name = sorted(unknown)[0]
        raise HyperparameterError(f"method.supervised.hyperparameters.{name}",
                                  f"Unknown hyperparameter `{name}`; expected n_epochs, batch_size, "
                                  "learning_rate_multiplier")
    out = {}
    for name, default in auto.items():
        value = requested.get(name, "auto")
        param = f"method.supervised.hyperparameters.{name}"
        if value == "auto" or value is None:
            out[name] = default
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HyperparameterError(param, f"{name} must be \"auto\" or a number, got {value!r}")
        if name in LIMITS:
            lo, hi = LIMITS[name]
            if float(value) != int(value) or not lo <= value <= hi:
                raise HyperparameterError(param, f"{name} must be \"auto\" or an integer from {lo} to {hi}, "
                                                 f"got {value!r}")
            out[name] = int(value)
        else:
            if not (0 < value <= 10) or math.isnan(value):
                raise HyperparameterError(param, f"{name} must be \"auto\" or a number in (0, 10], got {value!r}")
            out[name] = float(value)
    return out


def build_recipe(*, base: str, method: str, train_path: str, validation_path: str | None, resolved: dict,
                 seed: int, run_dir: str, n_examples: int, save_every: int, threads: int | None) -> Recipe:
    """The recipe of a job (raises RecipeError if it is not valid). Rows are not packed, so an epoch
    is exactly ceil(n_examples / batch_size) steps and `save_every: 0` means one checkpoint per epoch."""
    per_epoch = math.ceil(n_examples / resolved["batch_size"])
    data = {"train": train_path} | ({"validation": validation_path} if validation_path else {})
    train = {
        "epochs": resolved["n_epochs"], "micro_batch_size": resolved["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": METHODS[method].auto_learning_rate * resolved["learning_rate_multiplier"],
        "seed": seed, "packing": False, "save_every": save_every or per_epoch, "keep_checkpoints": 3,
    } | ({"num_threads": threads} if threads else {})
    return recipe_from_dict({"model": {"name": base}, "method": {"name": method}, "data": data, "train": train,
                             "output": {"dir": run_dir, "overwrite": True}}, "job")
