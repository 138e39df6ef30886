"""Uploaded files: checked as fine-tuning data before they are stored, written atomically.

    row = store_upload(service, tenant, upload_file, purpose="fine-tune")
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import UploadFile

from slmtune.data.validate import validate_file
from slmtune.http.errors import ApiError
from slmtune.service.core import Service
from slmtune.service.models import File, Tenant
from slmtune.service.store import new_id


def check_filename(name: str | None) -> str:
    if not name or not name.strip():
        raise ApiError(400, "The uploaded file needs a file name.", param="file", code="invalid_filename")
    if "/" in name or "\\" in name or "\x00" in name or name in (".", "..") or len(name) > 255:
        raise ApiError(400, f"File name {name!r} is not allowed: give a plain name without directories.",
                       param="file", code="invalid_filename")
    return name


def check_upload(data: bytes, tmp: Path) -> tuple[str | None, int]:
    """Validate a fine-tune upload written at `tmp`: (format, n_examples) or an ApiError."""
    if not data.strip():
        raise ApiError(400, "The file is empty.", param="file", code="empty_file")
    report = validate_file(tmp, min_examples=1)
    errors = [i for i in report.errors if i.code != "too_few_examples"]
    if errors:
        shown = "; ".join(f"line {i.line}: {i.code}: {i.message}" if i.line else f"{i.code}: {i.message}"
                          for i in errors[:5])
        n = len(errors) + report.unlisted_errors
        more = f" (and {n - 5} more)" if n > 5 else ""
        code = "invalid_encoding" if errors[0].code == "invalid_encoding" else "invalid_file_format"
        raise ApiError(400, f"Invalid file format for fine-tuning: {shown}{more}", param="file", code=code)
    if report.n_examples == 0:
        raise ApiError(400, "The file has no examples.", param="file", code="invalid_n_examples")
    return report.format, report.n_examples


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"The file is larger than the limit of {limit} bytes.", param="file", code="file_too_large")


def store_upload(service: Service, tenant: Tenant, file: UploadFile, purpose: str) -> File:
    """Check and store one upload; nothing is left on disk or in the store when it is refused."""
    settings = service.settings
    if purpose != "fine-tune":
        raise ApiError(400, f"purpose {purpose!r} is not supported; use \"fine-tune\".", param="purpose",
                       code="invalid_purpose")
    filename = check_filename(file.filename)
    n_files, n_bytes = service.store.files_usage(tenant.id)
    if n_files >= settings.max_files:
        raise ApiError(429, f"You keep {n_files} files, the most allowed ({settings.max_files}); delete some first.",
                       type="rate_limit_error", param="file", code="too_many_files")
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise too_large(settings.max_upload_bytes)
    if n_bytes + len(data) > settings.max_tenant_bytes:
        raise ApiError(429, f"Your files would take {n_bytes + len(data)} bytes, more than allowed "
                            f"({settings.max_tenant_bytes}); delete some first.", type="rate_limit_error",
                       param="file", code="storage_quota_exceeded")
    file_id = new_id("file")
    files_dir = settings.service_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    tmp = files_dir / f".{file_id}.tmp"
    final = files_dir / f"{file_id}.jsonl"
    try:
        tmp.write_bytes(data)
        fmt, n = check_upload(data, tmp)
        os.replace(tmp, final)
        row = File(id=file_id, tenant_id=tenant.id, filename=filename, purpose=purpose, bytes=len(data),
                   path=str(final), format=fmt, n_examples=n, created_at=time.time())
        try:
            service.store.add_file(row)
        except Exception:
            final.unlink(missing_ok=True)
            raise
    finally:
        tmp.unlink(missing_ok=True)
    return row
