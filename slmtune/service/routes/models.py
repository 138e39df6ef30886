"""/v1/models (the base models offered and the tenant's fine-tuned models) and /health."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from slmtune.service.core import Service, model_not_found
from slmtune.service.deps import current_tenant, get_service
from slmtune.service.models import Tenant

router = APIRouter()


@router.get("/v1/models")
def list_models(t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    return {"object": "list", "data": service.model_cards(t)}


@router.get("/v1/models/{name:path}")
def get_model(name: str, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    for card in service.model_cards(t):
        if card["id"] == name:
            return card
    raise model_not_found(name)


@router.get("/health")
def health():
    return {"status": "ok"}
