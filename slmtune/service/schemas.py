"""What the fine-tuning API takes and gives: request bodies (validated, unknown keys are errors)
and the public shapes of files, jobs, events and checkpoints, as OpenAI defines them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmtune.methods import SERVICE_METHODS
from slmtune.service.hyper import HYPERPARAMETERS
from slmtune.service.models import Checkpoint, Event, File, Job, Tenant


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodSettings(Body):
    hyperparameters: dict[str, Any] | None = None


class ReinforcementSettings(MethodSettings):
    """OpenAI's method.reinforcement: the grader (checked at job creation) and the hyperparameters."""
    grader: dict


METHOD_TYPES = ("supervised", "dpo", "reinforcement")  # OpenAI's method.type values the service trains


class MethodSpec(Body):
    type: Literal[METHOD_TYPES]  # type: ignore[valid-type]
    supervised: MethodSettings | None = None
    dpo: MethodSettings | None = None
    reinforcement: ReinforcementSettings | None = None

    @model_validator(mode="after")
    def _reinforcement_has_its_grader(self) -> "MethodSpec":
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.reinforcement (with its `grader`) is required for method.type reinforcement")
        return self

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> "MethodSpec":
        for other in METHOD_TYPES:
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} is given but method.type is {self.type}")
        return self

    def hyperparameters(self) -> dict:
        settings = getattr(self, self.type)
        return (settings.hyperparameters if settings is not None else None) or {}


class WandbIntegration(Body):
    """OpenAI's Weights & Biases integration; the server's own WANDB_API_KEY (or WANDB_MODE=offline) applies."""
    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, max_length=128)
    entity: str | None = Field(None, max_length=128)
    tags: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=32)


class MlflowIntegration(Body):
    """slmtune's MLflow integration: the server's tracking URI (SLMTUNE_MLFLOW_TRACKING_URI), the tenant's names."""
    experiment: str | None = Field(None, max_length=128)
    name: str | None = Field(None, max_length=128)
    tags: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=32)


class Integration(Body):
    type: Literal["wandb", "mlflow"]
    wandb: WandbIntegration | None = None
    mlflow: MlflowIntegration | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> "Integration":
        if self.type == "wandb" and self.wandb is None:
            raise ValueError("an integration of type wandb needs its `wandb` object (at least `project`)")
        if self.type == "mlflow" and self.mlflow is None:
            self.mlflow = MlflowIntegration()
        other = "mlflow" if self.type == "wandb" else "wandb"
        if getattr(self, other) is not None:
            raise ValueError(f"integration.{other} is given but its type is {self.type}")
        return self


class JobCreate(Body):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: MethodSpec | None = None
    hyperparameters: dict[str, Any] | None = None  # OpenAI's older top-level form
    slmtune_method: Literal[SERVICE_METHODS] = "lora"  # type: ignore[valid-type]  # extension: how slmtune trains
    integrations: list[Integration] | None = Field(None, max_length=2)

    @model_validator(mode="after")
    def _one_integration_per_type(self) -> "JobCreate":
        types = [i.type for i in self.integrations or []]
        if len(types) != len(set(types)):
            raise ValueError("integrations: at most one of each type")
        return self


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None

    @classmethod
    def of(cls, f: File) -> "FilePublic":
        return cls(id=f.id, bytes=f.bytes, created_at=int(f.created_at), filename=f.filename, purpose=f.purpose)


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict
    method: dict
    trained_tokens: int | None
    error: dict | None
    user_provided_suffix: str | None
    seed: int
    metadata: dict | None
    integrations: list = []
    estimated_finish: int | None = None
    slmtune_method: str

    @classmethod
    def of(cls, j: Job, tenant: Tenant) -> "JobPublic":
        method_type = j.resolved.get("method_type", "supervised")
        hp = {k: j.resolved[k] for k in HYPERPARAMETERS[method_type]}
        return cls(id=j.id, model=j.model, created_at=int(j.created_at),
                   finished_at=int(j.finished_at) if j.finished_at else None, fine_tuned_model=j.fine_tuned_model,
                   organization_id=tenant.name, result_files=list(j.result_files or []), status=j.status,
                   training_file=j.training_file, validation_file=j.validation_file, hyperparameters=hp,
                   method={"type": method_type, method_type: {"hyperparameters": hp}
                           | ({"grader": j.resolved["grader"]} if "grader" in j.resolved else {})},
                   trained_tokens=j.trained_tokens, error=j.error, user_provided_suffix=j.suffix, seed=j.seed,
                   metadata=j.metadata_, slmtune_method=j.method, integrations=j.resolved.get("integrations", []))


def event_public(e: Event) -> dict:
    return {"object": "fine_tuning.job.event", "id": e.id, "created_at": int(e.created_at), "level": e.level,
            "message": e.message, "type": e.type, "data": e.data}


def checkpoint_public(c: Checkpoint, job: Job) -> dict:
    name = job.resolved["fine_tuned_model"]
    return {"object": "fine_tuning.job.checkpoint", "id": c.id, "created_at": int(c.created_at),
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{c.step}", "step_number": c.step,
            "metrics": c.metrics, "fine_tuning_job_id": job.id}


def page(items: list, has_more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}
