"""Recipes: the typed description of one fine-tuning run, loaded from YAML.

    recipe = load_recipe("recipes/quickstart/support_assistant.yaml", ["train.epochs=2"])

A recipe has five sections: `model`, `method`, `data`, `train`, `output`. Every section is a
pydantic model that forbids unknown keys, so a typo such as `lora_rank` is an error naming the
file, line and field instead of a silently ignored setting. Relative paths are resolved against
the working directory, the way every recipe's first-line command runs them.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import re

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmtune import auto
from slmtune.graders import GraderError, check_grader
from slmtune.methods import METHOD_CONFIGS, METHODS
from slmtune.tasks import TASK_NAMES, TASKS


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, line and field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(description="Catalog name (smollm2-135m-instruct), local HF directory, .gguf file or hub id.")
    attn_implementation: Literal["sdpa", "sdpa_mask", "eager"] = Field(
        "sdpa", description="Attention kernel. sdpa: PyTorch's scaled_dot_product_attention, on packed rows "
        "run on each packed example alone; sdpa_mask: sdpa over whole packed rows with the 4D "
        "block-diagonal mask (computes the masked-out blocks too); eager: transformers' reference, with the mask."
    )
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Storage dtype of the base weights an adapter method keeps frozen. auto: bfloat16 "
        "when training computes in bf16 (train.precision) on one process or DDP, else float32. QLoRA keeps "
        "its own; full fine-tuning keeps fp32 master weights (bfloat16 is an error there)."
    )
    adapter: str | None = Field(
        None, description="Start from this adapter (a finished run directory or a PEFT adapter directory) instead "
        "of a fresh one: the usual SFT-then-DPO flow. Its settings (rank, targets) must match `method`."
    )


class DataSection(Section):
    train: str = Field(description="Training JSONL file.")
    validation: str | None = Field(None, description="Validation JSONL file.")
    validation_split: Annotated[float, Field(ge=0.0, lt=0.5)] | Literal["auto"] = Field(
        "auto", description="Fraction of `train` held out for validation when no file is given; auto: none "
        "below 200 examples, else 10% clamped to 32-256 examples (slmtune/auto.py), seeded; 0: none."
    )
    format: Literal["auto", "chat", "prompt_completion", "text", "preference"] = "auto"
    task: Literal[TASK_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="Rows are task data (slmtune/tasks/<task>.py), turned into chat/text examples "
        "by the task's template before tokenization; null: the files are chat/prompt_completion/text."
    )
    max_examples: int | None = Field(
        None, ge=1, description="Use a seeded random sample of at most this many training examples, and "
        "as many validation examples at most; null: all of them."
    )
    max_length: int = Field(1024, ge=16, description="Tokens per example; longer examples are cut.")
    system_prompt: str | None = Field(None, description="Prepended to chat examples that have no system message.")

    @model_validator(mode="after")
    def _one_validation_source(self) -> "DataSection":
        if self.validation and self.validation_split not in (0, "auto"):
            raise ValueError("give either data.validation or data.validation_split, not both")
        if self.task and self.format != "auto":
            raise ValueError("data.task sets the format; leave data.format at auto")
        return self


ZERO_STAGES = ("zero1", "zero2", "zero3")


class DistributedSection(Section):
    """Data parallelism over the processes `slmtune train --nproc N` (torchrun) starts. Each optimizer
    step then consumes micro_batch_size x gradient_accumulation_steps x processes rows, with the loss
    trajectory of one process on the same global batch (slmtune/training/distributed.py)."""

    strategy: Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp"] = Field(
        "none", description="none: one process (ddp when launched on several); ddp: every process holds "
        "everything; zero1/zero2/zero3: DeepSpeed shards optimizer states / + gradients / + parameters "
        "(pip install -e '.[deepspeed]'); fsdp: PyTorch FSDP2, the native ZeRO-3."
    )
    offload: Literal["none", "optimizer", "optimizer+params"] = Field(
        "none", description="DeepSpeed ZeRO-Offload: keep optimizer states (and with zero3 the parameters) "
        "in CPU memory; only with the zero stages."
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "DistributedSection":
        if self.offload != "none" and self.strategy not in ZERO_STAGES:
            raise ValueError(f"offload: {self.offload} needs strategy zero1, zero2 or zero3 (DeepSpeed), "
                             f"not {self.strategy}")
        if self.offload == "optimizer+params" and self.strategy != "zero3":
            raise ValueError("offload: optimizer+params needs strategy zero3 (only ZeRO-3 partitions parameters)")
        return self


ROWS_PER_STEP = 8  # the default optimizer step, in rows, on any device


# --- objectives: what the loop minimizes (slmtune/training/objectives/<name>.py each) ---------------
class SFTObjective(Section):
    """Supervised fine-tuning: next-token cross-entropy on the target tokens (chat, prompt/completion, text)."""

    name: Literal["sft"] = "sft"


class DPOObjective(Section):
    """Direct preference optimization (Rafailov et al., 2023) on preference pairs, sigmoid loss."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, le=10, description="Strength of the KL constraint to the reference model.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Share of pairs assumed mislabelled (cDPO).")
    sft_weight: float = Field(
        auto.DPO_SFT_WEIGHT, ge=0, le=10, description="Weight of the preferred answer's mean token negative "
        "log-likelihood added to each pair's loss (RPO, Pang et al., 2024; TRL's rpo_alpha): keeps preferred "
        "answers likely where plain DPO lowers both and drifts into degenerate text (slmtune/auto.py); 0: plain DPO."
    )
    reference: Literal["auto", "adapter_disabled", "copy", "precomputed"] = Field(
        "auto", description="Where the reference log-probabilities come from. adapter_disabled: the same model "
        "with its adapter off (no second copy); copy: a frozen copy of the starting weights; precomputed: one "
        "pass over the data before training (no second model in memory, one extra forward per pair once). auto: "
        "adapter_disabled for adapter methods, precomputed for full fine-tuning or a model.adapter start."
    )


class ORPOObjective(Section):
    """Odds-ratio preference optimization (Hong et al., 2024): SFT on the preferred answer plus an
    odds-ratio term; no reference model."""

    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, le=10, description="Weight (lambda) of the odds-ratio term.")


class GRPOObjective(Section):
    """Group-relative policy optimization (Shao et al., 2024) on prompts scored by a grader: OpenAI's
    reinforcement fine-tuning (slmtune/training/objectives/grpo.py, docs/reinforcement.md)."""

    name: Literal["grpo"] = "grpo"
    grader: dict = Field(description="An OpenAI grader (docs/graders.md), inline or the path of its JSON file; "
                         "the saved recipe.yaml holds it inline.")
    num_generations: int = Field(auto.GRPO_GENERATIONS, ge=2, le=64, description="Answers sampled per prompt (the "
                                 "group whose rewards are compared).")
    prompts_per_step: int = Field(auto.GRPO_PROMPTS_PER_STEP, ge=1, le=256, description="Prompts per optimizer "
                                  "step; a step trains on prompts_per_step x num_generations sampled answers.")
    max_completion_tokens: int = Field(auto.GRPO_MAX_COMPLETION_TOKENS, ge=1, le=4096, description="Longest "
                                       "sampled answer, in tokens (the end-of-turn token included).")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the training answers.")
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0, le=10, description="Weight of the per-token KL to the reference (the starting "
                        "weights; with an adapter, the base with the adapter off). 0, as current practice "
                        "(DAPO, Dr. GRPO), computes no reference at all.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clipping range of the probability ratio.")
    loss_normalization: Literal["token", "sequence"] = Field(
        "token", description="token: the step's loss is the mean over all its answer tokens (long answers weigh "
        "more; DAPO); sequence: each answer's token mean, averaged over answers (the GRPO paper's)."
    )
    scale_rewards: Literal["group", "none"] = Field(
        "group", description="group: advantages are (reward - group mean) / group std; none: reward - group "
        "mean (Dr. GRPO: no bias toward groups of near-equal rewards)."
    )
    eval_samples: int = Field(auto.GRPO_EVAL_SAMPLES, ge=1, le=4096, description="Validation prompts answered "
                              "(greedy) and graded at each evaluation; validation reward = their mean reward.")

    @field_validator("grader", mode="before")
    @classmethod
    def _grader_file(cls, value):
        if isinstance(value, (str, os.PathLike)):
            try:
                value = json.loads(Path(value).read_text(encoding="utf-8"))
            except OSError as err:
                raise ValueError(f"cannot read grader file {value}: {err.strerror}") from None
            except ValueError as err:
                raise ValueError(f"grader file {value} is not JSON: {err}") from None
        return value

    allow_python_grader: bool = Field(False, description="Run python graders (the grader's own code, in a "
                                      "sandboxed subprocess; docs/graders.md). Off by default, so a recipe from "
                                      "someone else cannot run code by itself; `slmtune train --allow-python-graders`.")

    @model_validator(mode="after")
    def _grader_valid(self) -> "GRPOObjective":
        try:
            check_grader(self.grader, python_allowed=True)
        except GraderError as err:
            message, field = str(err), err.param.rsplit(".", 1)[-1]
            message = message[len(field) + 2:] if message.startswith(f"{field}: ") else message
            raise ValueError(f"{err.param}: {message}") from None
        try:
            check_grader(self.grader, python_allowed=self.allow_python_grader)
        except GraderError as err:
            raise ValueError(f"{err.param}: a python grader runs its own code; allow it with "
                             "train.objective.allow_python_grader: true (slmtune train --allow-python-graders)") from None
        return self


OBJECTIVE_CONFIGS = {c.model_fields["name"].default: c
                     for c in (SFTObjective, DPOObjective, ORPOObjective, GRPOObjective)}
# Training numerics: recipes' train.precision and the service's SLMTUNE_TRAIN_PRECISION for its jobs.
Precision = Literal["auto", "bf16", "fp32"]

ObjectiveSection = Annotated[Union[tuple(OBJECTIVE_CONFIGS.values())], Field(discriminator="name")]
PREFERENCE_OBJECTIVES = ("dpo", "orpo")


DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(value) -> float:
    """Seconds of "90", "90s", "10m", "1h", "1h30m" (a bare number is seconds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        match = DURATION.fullmatch(text)
        if not text or match is None or not any(match.groups()):
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"{value!r} is not a duration; use e.g. 90s, 10m, 1h or 1h30m") from None
        else:
            h, m, sec = (float(g) if g else 0.0 for g in match.groups())
            seconds = 3600 * h + 60 * m + sec
    if not 0 < seconds < 30 * 86400:
        raise ValueError(f"{value!r}: a duration must be more than 0 and less than 30 days")
    return seconds


class TrackingSection(Section):
    """Where and under which names the run is reported (train.report_to chooses the backends)."""

    project: str | None = Field(None, max_length=128, description="W&B project / MLflow experiment "
                                "(default: slmtune).")
    experiment: str | None = Field(None, max_length=128, description="MLflow experiment (default: project).")
    name: str | None = Field(None, max_length=128, description="The run's name (default: the run folder's).")
    entity: str | None = Field(None, max_length=128, description="W&B entity (team or user).")
    tags: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=32)
    tracking_uri: str | None = Field(None, max_length=2048, description="MLflow tracking URI (default: "
                                     "$MLFLOW_TRACKING_URI, else SQLite in RUN_DIR/mlflow.db).")


class TrainSection(Section):
    objective: ObjectiveSection = Field(
        default_factory=SFTObjective, description="What training minimizes: sft (default), dpo or orpo "
        "(preference pairs), grpo (prompts and a grader); `objective: dpo` is short for {name: dpo}."
    )
    epochs: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Passes over the training data (ignored when max_steps or time_budget is set); auto: "
        "from the number of examples (prompts, for grpo) and, for sft, the answers' tokens, the objective "
        "(slmtune/auto.py), as the service's \"auto\"."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    # On CPU one packed row of max_length tokens already keeps the matmuls busy: a second row per
    # forward pass doubles the activations held for backward without raising tokens/s (SmolLM2-135M,
    # 1024-token rows, one row against two: 0.69x peak RSS, 1.12x tokens/s; docs/benchmarks.md).
    # Accumulation keeps the optimizer step at 8 rows either way.
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Rows per forward pass (a packed row holds several examples). auto: 1 on CPU, "
        "4 on a GPU."
    )
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description=f"Micro-batches per optimizer step. Default: {ROWS_PER_STEP} rows per step "
        f"({ROWS_PER_STEP} / micro_batch_size, at least 1); unset when examples_per_step is."
    )
    examples_per_step: int | None = Field(
        None, ge=1, description="Exactly this many examples per optimizer step, packed into as few rows as fit "
        "(micro_batch_size rows per forward pass); replaces gradient_accumulation_steps. Default: steps of "
        "micro_batch_size x gradient_accumulation_steps rows, however many examples those hold; with neither set, "
        "files under 1024 examples step every few examples (slmtune/auto.py batch_size, the service's rule)."
    )
    learning_rate: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="Peak learning rate; auto: the method's base rate (1e-3 for LoRA/QLoRA/DoRA, 5e-5 "
        "for full fine-tuning; slmtune/auto.py)."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    neftune_alpha: float | None = Field(
        None, ge=0, description="NEFTune: uniform noise of scale alpha / sqrt(example length x hidden) on the input "
        "embeddings while training (Jain et al. 2023; 5 is the paper's usual value); supervised objective only. "
        "null: none."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables it.")
    seed: int = 42
    precision: Precision = Field(
        "auto", description="auto: bf16 autocast where the hardware has native bf16, else fp32."
    )
    packing: Literal["auto"] | bool = Field(
        "auto", description="Pack short examples into rows (each example attends only to itself)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: much less memory, ~15% slower."
    )
    cross_entropy: Literal["fused", "plain"] = Field(
        "fused", description="fused: the LM head and cross-entropy run on loss_chunk_tokens targets at a time "
        "with their gradients made in forward, so targets x vocabulary logits never exist at once; plain: one "
        "cross-entropy over all targets' logits."
    )
    loss_chunk_tokens: int | None = Field(
        None, ge=1, description="Target tokens per chunk of the fused cross-entropy; null: about 16M logits "
        "per chunk (256 targets for a 49k vocabulary)."
    )
    eval_every: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="Validation loss every N steps; 0 = only at the end; auto: about 5 times per run."
    )
    select_best: bool = Field(
        True, description="With validation data, the run's result is the weights of the best evaluation (the "
        "lowest validation loss, or the highest task metric with select_by: metric; summary.json: best_step), "
        "not necessarily the last step's."
    )
    select_by: Literal["loss", "metric"] = Field(
        "loss", description="What picks the best evaluation (select_best, early stopping): loss, the validation "
        "loss; metric, the task's headline metric (slmtune/tasks/<task>.py METRIC, e.g. macro_f1) of greedy "
        "answers to the validation rows, scored by the code of `slmtune eval` (needs data.task)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop when the validation loss (the task metric, with select_by: metric) has not "
        "improved for this many evaluations."
    )
    time_budget: str | None = Field(
        None, description="Train for about this long (e.g. 90s, 10m, 1h): the step count is set from the "
        "throughput of the first steps, and warmup and decay are planned for it; overrides epochs and max_steps."
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that receive the run's metrics, recipe and "
        "result (docs/tracking.md); `report_to: tensorboard` is short for [tensorboard]."
    )
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="{project, name, entity, "
                                      "tags, tracking_uri} for report_to.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps; 0 = no intermediate checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    log_every: int = Field(1, ge=1)
    num_threads: int | None = Field(None, ge=1, description="torch threads; default: physical cores.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="{strategy, offload}; `distributed: fsdp` is short "
        "for {strategy: fsdp}. Start the processes with `slmtune train ... --nproc N`."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("time_budget", mode="before")
    @classmethod
    def _budget_text(cls, value):
        if value is None:
            return None
        parse_duration(value)  # raises ValueError naming the accepted forms
        return str(value)

    @property
    def time_budget_seconds(self) -> float | None:
        return None if self.time_budget is None else parse_duration(self.time_budget)

    def resolved_for_data(self, n_examples: int, method: str, target_tokens: int | None = None,
                          held_out: int = 0) -> "TrainSection":
        """`epochs` and `learning_rate` "auto", and a step size the recipe left unset, made concrete for a
        training file of `n_examples` examples (pairs) whose answers hold `target_tokens` tokens
        (Datasets.n_target_tokens), `held_out` of them for validation, and `method`, by the one rule
        in slmtune/auto.py that the service uses too."""
        update = {}
        if self.epochs == "auto":
            update["epochs"] = float(auto.epochs(n_examples, self.objective.name, target_tokens, held_out))
        if self.learning_rate == "auto":
            update["learning_rate"] = auto.learning_rate(method, self.objective.name)
        if self.examples_per_step is None and self.gradient_accumulation_steps is None:
            # No step size given: small sets step every few examples, as a service job of the same
            # file does (75 conversations packed into 8-row steps would make one step per epoch).
            # grpo steps by objective.prompts_per_step.
            if n_examples < auto.EXAMPLE_STEPS_BELOW and self.objective.name != "grpo":
                update["examples_per_step"] = auto.batch_size(n_examples)
            else:
                micro = self.micro_batch_size if self.micro_batch_size != "auto" else 1
                update["gradient_accumulation_steps"] = max(1, ROWS_PER_STEP // micro)
        return self.model_copy(update=update)

    @field_validator("distributed", mode="before")
    @classmethod
    def _strategy_shorthand(cls, value):
        return {"strategy": value} if isinstance(value, str) else value

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_shorthand(cls, value):
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict):
            return {"name": "sft"} | value
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_step_size(cls, values):
        # A saved recipe.yaml spells out both fields, one of them null, and must load back as it was.
        if not isinstance(values, dict):
            return values
        accumulation, examples = values.get("gradient_accumulation_steps"), values.get("examples_per_step")
        if accumulation is not None and examples is not None:
            raise ValueError("set either examples_per_step or gradient_accumulation_steps, not both: "
                             "examples_per_step decides how many micro-batches a step takes")
        return values

    @model_validator(mode="after")
    def _chunks_need_fused_loss(self) -> "TrainSection":
        if self.loss_chunk_tokens is not None and self.cross_entropy == "plain":
            raise ValueError("loss_chunk_tokens sets the chunks of cross_entropy: fused; plain takes all targets at once")
        # GRPO samples its answers with the policy in training mode, and preference losses compare the
        # policy with a reference on the same inputs: noise there would change what is measured.
        if self.neftune_alpha and self.objective.name != "sft":
            raise ValueError(f"neftune_alpha applies to the sft objective, not {self.objective.name}")
        return self

    def resolved(self, accelerator: bool) -> "TrainSection":
        """The step size made concrete for this machine: what the run uses and saves in recipe.yaml."""
        micro = self.micro_batch_size if self.micro_batch_size != "auto" else (4 if accelerator else 1)
        # With neither gradient_accumulation_steps nor examples_per_step set, the step size waits for the
        # data (resolved_for_data).
        return self.model_copy(update={"micro_batch_size": micro})


class OutputSection(Section):
    dir: str = Field(description="Run directory: adapter/, recipe.yaml, metrics.jsonl, summary.json.")
    overwrite: bool = Field(False, description="Replace an existing run directory.")


MethodSection = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]


class Recipe(Section):
    model: ModelSection
    method: MethodSection = Field(default_factory=lambda: METHOD_CONFIGS["lora"]())
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection

    @model_validator(mode="after")
    def _method_fits_strategy(self) -> "Recipe":
        strategy = self.train.distributed.strategy
        if self.model.frozen_dtype == "bfloat16" and self.method.name == "full":
            raise ValueError("model.frozen_dtype bfloat16: full fine-tuning trains every weight and keeps fp32 "
                             "master weights; use float32 or auto")
        if self.method.name == "qlora" and strategy not in ("none", "ddp"):
            raise ValueError(f"train.distributed.strategy {strategy}: QLoRA's 4-bit base weights cannot be "
                             "sharded; use ddp (or lora/full with fsdp or a zero stage)")
        objective = self.train.objective.name
        if objective in PREFERENCE_OBJECTIVES + ("grpo",) and not METHODS[self.method.name].packing:
            raise ValueError(f"train.objective {objective}: method {self.method.name} learns virtual "
                             "tokens; preference and reinforcement objectives train lora, qlora, dora, ia3 or full")
        if objective == "grpo" and strategy != "none":
            # Every process would sample and grade the whole step: any difference between them (a
            # judge's unseeded sampling, a grader timing out on one) desynchronizes their steps.
            raise ValueError(f"train.distributed.strategy {strategy}: train.objective grpo trains in one process "
                             "(sampling split across processes is not built yet); use strategy none")
        if self.train.select_by == "metric":
            task = TASKS.get(self.data.task) if self.data.task else None
            if task is None or task.MAX_NEW_TOKENS == 0:
                raise ValueError("train.select_by metric scores generated answers to task rows; set data.task to a "
                                 "task with a generated metric (not domain), or use select_by loss")
            if objective != "sft" or strategy != "none":
                raise ValueError("train.select_by metric: supervised training (objective sft) in one process "
                                 "(strategy none); use select_by loss")
        if self.model.adapter and METHODS[self.method.name].artifact != "adapter":
            raise ValueError(f"model.adapter starts from an adapter; method {self.method.name} trains a whole model")
        if METHODS[self.method.name].rewrites_base(self.method) and strategy in ("zero3", "fsdp"):
            raise ValueError(f"train.distributed.strategy {strategy}: lora_init {self.method.lora_init} converts "
                             "the adapter with the full base weights at the end; use ddp, zero1 or zero2")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _line_numbers(text: str) -> dict[tuple, int]:
    """Map every key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise RecipeError(f"override {item!r}: {part} is not a section")
            node = node[part]
        node[path[-1]] = value
    return raw


UNION_BRANCH = re.compile(r"constrained-\w+|literal\[.*\]|int|float|bool|str")


def _format_errors(err: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    out = []
    for e in err.errors():
        # A value-or-"auto" field fails both branches; its "should be 'auto'" half is said once, below.
        if e["type"] == "literal_error" and str(e["loc"][-1]).startswith("literal["):
            continue
        # Drop the tags pydantic puts into union locations: discriminators (method.lora.lora_r ->
        # method.lora_r) and union branches (train.epochs.constrained-float -> train.epochs).
        loc = tuple(str(p) for i, p in enumerate(e["loc"])
                    if not (i > 0 and e["loc"][i - 1] in ("method", "objective")
                            and p in {**METHOD_CONFIGS, **OBJECTIVE_CONFIGS})
                    and not UNION_BRANCH.fullmatch(str(p)))
        auto_allowed = any(str(p).startswith("constrained-") or str(p) in ("int", "float", "bool")
                           for p in e["loc"][1:])
        field = ".".join(loc) or "(recipe)"
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f"{source}:{line}" if line else source
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        out.append(f"{where}: {field}: {msg}" + (", or auto" if auto_allowed else ""))
    return "\n".join(dict.fromkeys(out))


def recipe_from_dict(raw: dict, source: str = "<recipe>", text: str = "") -> Recipe:
    """Validate a recipe given as a dict (`raw` is not changed); `source`/`text` locate errors."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with sections model, method, data, train, output")
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("model"), str):
        raw["model"] = {"name": raw["model"]}
    if isinstance(raw.get("method"), str):
        raw["method"] = {"name": raw["method"]}
    if isinstance(raw.get("method"), dict):
        raw["method"].setdefault("name", "lora")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source, _line_numbers(text))) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    return recipe_from_dict(apply_overrides(raw, overrides or []), str(path), text)
