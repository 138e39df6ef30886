"""OpenAI's grader endpoints: test a grader before paying for a reinforcement job.

    POST /v1/fine_tuning/alpha/graders/validate   {"grader"}                          -> {"grader"}
    POST /v1/fine_tuning/alpha/graders/run        {"grader", "model_sample", "item"}  -> {"reward", "metadata",
                                                                                          "sub_rewards", ...}
A grader that cannot run is a 400 naming the field (`param`: grader.graders.exact.operation ...);
failures while grading a sample are the answer's `metadata.errors`, as OpenAI reports them. Python
graders run in the sandbox (slmtune/grader_sandbox.py) and only when the operator started the
service with `--allow-python-graders`; score_model graders ask a model this service serves (the
base model, or one of the tenant's fine-tuned models).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from slmtune.grader_sandbox import run_python
from slmtune.graders import GraderError, check_grader, grade, judge_sampling
from slmtune.http.errors import ApiError
from slmtune.serve.engine import SamplingParams
from slmtune.service.core import Service
from slmtune.service.deps import current_tenant, get_service
from slmtune.service.models import Tenant

router = APIRouter()
MAX_SAMPLE_CHARS = 100_000
SCORE_MODEL_SECONDS = 120


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict


class RunBody(ValidateBody):
    model_sample: str = Field(max_length=MAX_SAMPLE_CHARS)
    item: dict | None = None


def served_models(service: Service, tenant: Tenant) -> set[str]:
    """The models a score_model grader may ask: what this service answers chat completions with."""
    return {card["id"] for card in service.model_cards(tenant) if card["served"]}


def checked(body: ValidateBody, service: Service, tenant: Tenant) -> dict:
    try:
        check_grader(body.grader, python_allowed=service.settings.allow_python_graders,
                     model_names=served_models(service, tenant) if service.engine is not None else set())
    except GraderError as err:
        raise ApiError(400, str(err), param=err.param, code="invalid_grader") from None
    return body.grader


@router.post("/v1/fine_tuning/alpha/graders/validate")
def validate_grader(body: ValidateBody, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    return {"grader": checked(body, service, t)}


@router.post("/v1/fine_tuning/alpha/graders/run")
async def run_grader(body: RunBody, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    grader = checked(body, service, t)

    def ask(model: str, messages: list[dict], params: dict) -> str:
        service.ensure_served(t, model)
        max_tokens, temperature, seed = judge_sampling(params)
        request = service.engine.chat_request(model, messages, SamplingParams(
            max_tokens=max_tokens, temperature=temperature, seed=seed),
            owner=t.name)  # the engine's queue stays fair between tenants
        return service.engine.generate(request, timeout=SCORE_MODEL_SECONDS).text

    result = await asyncio.to_thread(grade, grader, body.model_sample, body.item or {},
                                     ask=ask if service.engine is not None else None,
                                     run_python=run_python if service.settings.allow_python_graders else None)
    return {"reward": result.reward, "metadata": result.metadata(grader), "sub_rewards": result.sub_rewards,
            "model_grader_token_usage_per_model": {}}
