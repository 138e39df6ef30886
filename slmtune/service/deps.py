"""FastAPI dependencies of the service's routes: the app's Service, and the tenant a request's key names.

Every route and the serving guard authenticate through `tenant_of` (one style for all of them)."""

from __future__ import annotations

from fastapi import Depends, Request

from slmtune.http.errors import ApiError
from slmtune.service import auth
from slmtune.service.core import Service
from slmtune.service.models import Tenant


def get_service(request: Request) -> Service:
    return request.app.state.service


def unauthorized() -> ApiError:
    return ApiError(401, "Incorrect API key provided. Create one with `slmtune keys create --tenant NAME` and send "
                         "`Authorization: Bearer <key>`.", code="invalid_api_key")


def tenant_of(service: Service, authorization: str | None) -> Tenant:
    """The tenant of an `Authorization: Bearer KEY` header, or a 401."""
    found = auth.tenant_from_header(service.store, authorization)
    if found is None:
        raise unauthorized()
    return found


def current_tenant(request: Request, service: Service = Depends(get_service)) -> Tenant:
    return tenant_of(service, request.headers.get("authorization"))
