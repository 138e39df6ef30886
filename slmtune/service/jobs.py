"""Creating a fine-tuning job, and moving it between states at the user's request; plain functions
over a `Service`, called by the routes (and testable without HTTP).

    job = create_job(service, tenant, JobCreate(model="smollm2-135m-instruct", training_file="file-..."))
"""

from __future__ import annotations

import random
import re
import time

from jinja2 import TemplateError

from slmtune.config import DataSection, RecipeError
from slmtune.data.dataset import CountTooSlow, encode_prompts
from slmtune.data.formats import DataError, Record, iter_jsonl
from slmtune.data.validate import validate_file
from slmtune.graders import GraderError, check_grader, item_fields
from slmtune.http.errors import ApiError
from slmtune.models import ModelError, load_tokenizer
from slmtune.serve.adapters import NAME_PATTERN
from slmtune.service import hyper
from slmtune.service.core import Service
from slmtune.service.settings import Settings
from slmtune.service.models import File, Job, Tenant
from slmtune.service.schemas import JobCreate
from slmtune.service.store import new_id

# A job's prompts are trained at the recipe's default data.max_length (hyper.build_recipe sets none).
PROMPT_MAX_TOKENS = DataSection.model_fields["max_length"].default
SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,18}")
MIN_TRAINING_EXAMPLES = 10


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No {what} with id `{ident}` exists.", param=param, code=f"{what.replace(' ', '_')}_not_found")


def own_job(service: Service, job_id: str, tenant: Tenant) -> Job:
    job = service.store.get_job(job_id, tenant.id)
    if job is None:
        raise not_found("fine-tuning job", job_id)
    return job


def training_input(service: Service, file_id: str | None, param: str, tenant: Tenant, minimum: int) -> File | None:
    """The tenant's uploaded file `file_id`, checked as training input, or an ApiError naming `param`."""
    if file_id is None:
        return None
    f = service.store.get_file(tenant.id, file_id)
    if f is None:
        raise ApiError(400, f"File `{file_id}` not found.", param=param, code="file_not_found")
    if f.purpose != "fine-tune":
        raise ApiError(400, f"File `{file_id}` has purpose {f.purpose!r}; upload it with purpose fine-tune.",
                       param=param, code="invalid_file_purpose")
    if f.n_examples < minimum:
        raise ApiError(400, f"{param.replace('_', ' ').capitalize()} `{file_id}` has {f.n_examples} example(s), "
                            f"but must have at least {minimum} examples.", param=param, code="invalid_n_examples")
    return f


# The data format each method type trains on (slmtune/data/formats.py); supervised: any other.
METHOD_FORMATS = {"dpo": "preference", "reinforcement": "reinforcement"}
FORMAT_SHAPES = {"preference": 'preference pairs ({"input", "preferred_output", "non_preferred_output"} per line)',
                 "reinforcement": 'prompts ({"messages": [... ending with the user\'s turn], <fields the grader '
                                  'reads>} per line)'}


def check_files_fit_method(method_type: str, train_file: File, val_file: File | None) -> None:
    """A dpo job trains on preference pairs, a reinforcement job on prompts, a supervised job on
    anything else: a clear 400 otherwise."""
    for f, param in ((train_file, "training_file"), (val_file, "validation_file")):
        if f is None:
            continue
        wanted = METHOD_FORMATS.get(method_type)
        if wanted is not None and f.format != wanted:
            raise ApiError(400, f"method.type {method_type} needs a file of {FORMAT_SHAPES[wanted]}, but "
                                f"`{f.id}` is {f.format} data.", param=param, code="invalid_file_format")
        owner = next((t for t, fmt in METHOD_FORMATS.items() if fmt == f.format), None)
        if wanted is None and owner is not None:
            raise ApiError(400, f"`{f.id}` holds {f.format} data, which trains with method.type {owner}, not "
                                f"{method_type}.", param=param, code="invalid_file_format")


def check_job_grader(service: Service, grader: dict, base_path: str, files: list[tuple[File, str]]) -> None:
    """A reinforcement job's grader must run here (python graders only where the operator allows
    them; score_model graders ask one of the service's base models), every row of its files must
    hold the fields its templates read, and every prompt must render with the base model's template
    within data.max_length tokens: a 400 now rather than a failed job later."""
    param = "method.reinforcement.grader"
    try:
        check_grader(grader, param, python_allowed=service.settings.allow_python_graders,
                     model_names=set(service.settings.models))
    except GraderError as err:
        raise ApiError(400, str(err), param=err.param, code="invalid_grader") from None
    fields = item_fields(grader)
    tokenizer = load_tokenizer(base_path)
    for f, file_param in files:
        report = validate_file(f.path, grader_fields=fields, min_examples=1)
        rows = sorted({issue.line for issue in report.errors if issue.line is not None})
        if rows:
            first = next(issue for issue in report.errors if issue.line == rows[0])
            raise ApiError(400, f"`{f.id}` line {first.line}: {first.message} ({len(rows)} row(s) with "
                                "problems for this grader).", param=param, code="invalid_file_format")
        records = [Record(line, row) for line, err, row in iter_jsonl(f.path) if err is None]
        try:
            encode_prompts(records, tokenizer, PROMPT_MAX_TOKENS, None, f.id)
        except DataError as err:
            raise ApiError(400, str(err).replace("data.max_length", "the limit of").replace(
                "raise the limit of or shorten", "shorten"), param=file_param,
                           code="invalid_file_format") from None
        except (TemplateError, ValueError, TypeError, KeyError) as err:  # the template refused a row's tools
            raise ApiError(400, f"`{f.id}`: the model's chat template cannot render a prompt: {str(err)[:300]}",
                           param=file_param, code="invalid_file_format") from None


def count_target_tokens(settings: Settings, model: str, f: File, *, validation_file: bool = False) -> int:
    """The answer tokens a supervised job of `model` on `f` trains on (hyper.target_tokens_of, within
    settings.token_count_seconds): a 400 naming the file (by id: the server's path stays private)
    when a row cannot be tokenized or the count takes too long, a 503 when the base model cannot
    be loaded here."""
    try:
        return hyper.target_tokens_of(settings.models[model], f.path, f.n_examples, validation_file=validation_file,
                                      time_limit=settings.token_count_seconds)
    except CountTooSlow as err:  # not the file's fault alone (the server's load): a code of its own
        raise ApiError(400, str(err).replace(f.path, f"`{f.id}`") + "; give n_epochs explicitly to skip counting",
                       param="training_file", code="token_count_too_slow") from None
    except DataError as err:
        raise ApiError(400, str(err).replace(f.path, f"`{f.id}`"), param="training_file",
                       code="invalid_file_format") from None
    except ModelError as err:
        raise ApiError(503, f"The base model cannot be loaded on this server to count the file's tokens: {err}",
                       type="server_error", code="model_unavailable") from None


def create_job(service: Service, tenant: Tenant, body: JobCreate) -> Job:
    """Check a job request, resolve its hyperparameters and recipe, and queue it."""
    settings, store = service.settings, service.store
    if body.model not in settings.models:
        offered = ", ".join(settings.models) or "none"
        raise ApiError(400, f"Model `{body.model}` is not available for fine-tuning (offered: {offered}).",
                       param="model", code="model_not_available")
    active = store.active_jobs(tenant.id)
    if active >= settings.max_queued_jobs:
        raise ApiError(429, f"You have {active} unfinished jobs, the most allowed at once "
                            f"({settings.max_queued_jobs}); wait for one to finish or cancel one.",
                       type="rate_limit_error", code="too_many_jobs")
    if body.suffix is not None and not SUFFIX_PATTERN.fullmatch(body.suffix):
        raise ApiError(400, "suffix: use 1-18 letters, digits, '-' or '_'.", param="suffix", code="invalid_suffix")
    if body.metadata is not None and (len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512
                                                                      for k, v in body.metadata.items())):
        raise ApiError(400, "metadata: at most 16 pairs, keys of at most 64 characters, values of at most 512.",
                       param="metadata", code="invalid_metadata")
    train_file = training_input(service, body.training_file, "training_file", tenant, MIN_TRAINING_EXAMPLES)
    val_file = training_input(service, body.validation_file, "validation_file", tenant, 1)
    if val_file is not None and train_file.format != val_file.format:
        raise ApiError(400, f"validation file is {val_file.format} but the training file is {train_file.format}.",
                       param="validation_file", code="invalid_validation_file")
    requested = body.hyperparameters or {}
    method_type = body.method.type if body.method is not None else "supervised"
    if body.method is not None:
        if body.hyperparameters is not None:
            raise ApiError(400, f"Give hyperparameters in method.{method_type}.hyperparameters only.",
                           param="hyperparameters", code="invalid_hyperparameters")
        requested = body.method.hyperparameters()
    check_files_fit_method(method_type, train_file, val_file)
    grader = body.method.reinforcement.grader if method_type == "reinforcement" else None
    if grader is not None:
        check_job_grader(service, grader, settings.models[body.model],
                         [(f, p) for f, p in ((train_file, "training_file"), (val_file, "validation_file"))
                          if f is not None])
    job_id = new_id("ftjob", 8)
    ft_name = f"ft:{body.model}:{tenant.name}:{body.suffix or ''}:{job_id}"
    if not NAME_PATTERN.fullmatch(ft_name):
        raise ApiError(400, f"The fine-tuned model name {ft_name!r} would be longer than 64 characters; use a "
                            "shorter suffix.", param="suffix", code="invalid_suffix")
    validation_given = val_file is not None
    try:
        resolved = hyper.resolve(requested, train_file.n_examples, method_type, validation_file=validation_given)
    except hyper.HyperparameterError as err:
        raise ApiError(400, str(err), param=err.param, code="invalid_hyperparameters") from None
    # "auto" supervised epochs count the answers' tokens too: tokenizing is the costly check, so it
    # runs last, once every cheap one has passed (and the values it can change are known valid).
    target_tokens = None
    if method_type == "supervised" and requested.get("n_epochs", "auto") in ("auto", None):
        target_tokens = count_target_tokens(settings, body.model, train_file, validation_file=validation_given)
        resolved = hyper.resolve(requested, train_file.n_examples, method_type, target_tokens,
                                 validation_file=validation_given)
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    run_dir = settings.service_dir / "jobs" / job_id / "run"
    integrations = [i.model_dump(exclude_none=True) for i in body.integrations or []]
    try:
        recipe = hyper.build_recipe(
            base=settings.models[body.model], method=body.slmtune_method, train_path=train_file.path,
            validation_path=val_file.path if val_file else None, resolved=resolved, seed=seed, run_dir=str(run_dir),
            n_examples=train_file.n_examples, save_every=settings.checkpoint_every, threads=settings.train_threads,
            precision=settings.train_precision,
            method_type=method_type, integrations=integrations, mlflow_tracking_uri=settings.mlflow_tracking_uri,
            grader=grader, models=settings.models)
    except RecipeError as err:
        raise ApiError(400, f"Cannot train this job: {err}", code="invalid_request") from None
    job = Job(id=job_id, tenant_id=tenant.id, model=body.model, base_path=settings.models[body.model],
              training_file=train_file.id, validation_file=val_file.id if val_file else None, suffix=body.suffix,
              seed=seed, metadata_=body.metadata, method=body.slmtune_method, hyperparameters=requested,
              resolved=resolved | {"recipe": recipe.model_dump(mode="json"), "fine_tuned_model": ft_name,
                                   "method_type": method_type, "integrations": integrations}
              | ({"grader": grader} if grader is not None else {}),
              status="queued", error=None,
              result_files=[], run_dir=str(run_dir), attempts=0, created_at=time.time())
    steps = hyper.steps_of(resolved, train_file.n_examples, validation_file=validation_given)
    settings_text = ", ".join(f"{k}={resolved[k]}" for k in hyper.HYPERPARAMETERS[method_type])
    unit = {"dpo": "preference pairs", "reinforcement": "prompts"}.get(method_type, "training examples")
    store.create_job(job, [
        f"Validating training file: {train_file.id}" + (f" and validation file: {val_file.id}" if val_file else ""),
        f"Files validated ({train_file.n_examples} {unit}"
        + (f" answering in {hyper.tokens_text(target_tokens, train_file.n_examples, validation_file=validation_given)} tokens"
           if target_tokens else "")
        + f"; {method_type}, {steps} steps with {settings_text}), "
        "moving job to queued state"])
    return job


# (status it moves to, statuses it may come from, the event's message)
TRANSITIONS = {
    "cancel": ("cancelled", ("validating_files", "queued", "running", "paused"), "Job was cancelled"),
    "pause": ("paused", ("queued", "running"), "Job was paused; it keeps its last checkpoint"),
    "resume": ("queued", ("paused",), "Job was resumed and is queued"),
}


def transition(service: Service, job_id: str, tenant: Tenant, action: str) -> Job:
    """Cancel, pause or resume a job (a conditional update: safe against a worker finishing it)."""
    to, allowed, message = TRANSITIONS[action]
    job = own_job(service, job_id, tenant)
    if not service.store.set_status(job_id, to, allowed_from=allowed, message=message):
        job = own_job(service, job_id, tenant)
        raise ApiError(400, f"Job {job_id} is {job.status}; it cannot be {to} now.", param=None,
                       code="invalid_job_state")
    return own_job(service, job_id, tenant)
