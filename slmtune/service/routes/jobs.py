"""/v1/fine_tuning/jobs: create, list, get, cancel / pause / resume, events, checkpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from slmtune.service.core import Service
from slmtune.service.deps import current_tenant, get_service
from slmtune.service.jobs import create_job, not_found, own_job, transition
from slmtune.service.models import Tenant
from slmtune.service.schemas import JobCreate, JobPublic, checkpoint_public, event_public, page

router = APIRouter(prefix="/v1/fine_tuning/jobs")


@router.post("")
def create(body: JobCreate, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    return JobPublic.of(create_job(service, t, body), t)


@router.get("")
def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100), t: Tenant = Depends(current_tenant),
              service: Service = Depends(get_service)):
    try:
        rows, more = service.store.list_jobs(t.id, after, limit)
    except LookupError:
        raise not_found("fine-tuning job", after, param="after") from None
    return page([JobPublic.of(j, t).model_dump() for j in rows], more)


@router.get("/{job_id}")
def get_job(job_id: str, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    return JobPublic.of(own_job(service, job_id, t), t)


@router.post("/{job_id}/cancel")
def cancel(job_id: str, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    return JobPublic.of(transition(service, job_id, t, "cancel"), t)


@router.post("/{job_id}/pause")
def pause(job_id: str, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    return JobPublic.of(transition(service, job_id, t, "pause"), t)


@router.post("/{job_id}/resume")
def resume(job_id: str, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    return JobPublic.of(transition(service, job_id, t, "resume"), t)


@router.get("/{job_id}/events")
def events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=100),
           t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    own_job(service, job_id, t)
    try:
        rows, more = service.store.list_events(job_id, after, limit)
    except LookupError:
        raise not_found("event", after, param="after") from None
    return page([event_public(e) for e in rows], more)


@router.get("/{job_id}/checkpoints")
def checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100),
                t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    job = own_job(service, job_id, t)
    try:
        rows, more = service.store.list_checkpoints(job_id, after, limit)
    except LookupError:
        raise not_found("checkpoint", after, param="after") from None
    return page([checkpoint_public(c, job) for c in rows], more)
