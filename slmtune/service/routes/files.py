"""/v1/files: upload (multipart: file + purpose=fine-tune), list, get, content, delete."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, File as FileParam, Form, Query, UploadFile
from fastapi.responses import Response

from slmtune.http.errors import ApiError
from slmtune.service.core import Service
from slmtune.service.deps import current_tenant, get_service
from slmtune.service.files import store_upload
from slmtune.service.jobs import not_found
from slmtune.service.models import Tenant
from slmtune.service.schemas import FilePublic, page

router = APIRouter(prefix="/v1/files")


@router.post("")
def upload(file: UploadFile = FileParam(...), purpose: str = Form(...), t: Tenant = Depends(current_tenant),
           service: Service = Depends(get_service)):
    return FilePublic.of(store_upload(service, t, file, purpose))


@router.get("")
def list_files(purpose: str | None = None, after: str | None = None, limit: int = Query(100, ge=1, le=10000),
               t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    try:
        rows, more = service.store.list_files(t.id, purpose, after, limit)
    except LookupError:
        raise not_found("file", after, param="after") from None
    return page([FilePublic.of(f).model_dump() for f in rows], more)


@router.get("/{file_id}")
def get_file(file_id: str, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    f = service.store.get_file(t.id, file_id)
    if f is None:
        raise not_found("file", file_id)
    return FilePublic.of(f)


@router.get("/{file_id}/content")
def file_content(file_id: str, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    f = service.store.get_file(t.id, file_id)
    if f is None:
        raise not_found("file", file_id)
    try:
        data = Path(f.path).read_bytes()
    except OSError:
        raise not_found("file", file_id) from None
    return Response(data, media_type="application/octet-stream")


@router.delete("/{file_id}")
def delete_file(file_id: str, t: Tenant = Depends(current_tenant), service: Service = Depends(get_service)):
    user = service.store.file_in_use(t.id, file_id)
    if user is not None:  # its jobs would fail without it
        raise ApiError(409, f"File {file_id} is used by job {user}, which has not finished; cancel it or wait.",
                       param="file_id", code="file_in_use")
    f = service.store.delete_file(t.id, file_id)
    if f is None:
        raise not_found("file", file_id)
    Path(f.path).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
