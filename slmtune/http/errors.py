"""OpenAI-shaped errors, for every route of both apps.

    raise ApiError(404, "No file with id `file-1` exists.", param="file_id", code="file_not_found")
    install_error_handlers(app)   # once per FastAPI app

Every error answers `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes:
400 invalid_request_error for bad input (request validation included), 401 for keys, 404 for
unknown ids and paths, 409 for conflicts, 413 for bodies over a limit, 429 for quotas and rate
limits, 500 server_error for bugs (never for a user's input).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("slmtune.http")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def server_error(err: BaseException) -> ApiError:
    return ApiError(500, f"The server had an error while processing your request: {type(err).__name__}",
                    type="server_error")


# pydantic puts union members' type names ("str", "list[TextPart]") into error locations; they mean
# nothing to a client.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}
_TYPE_TAG_PREFIXES = ("list[", "dict[", "function-", "literal[", "tagged-union[", "json-or-python[")
_VALIDATION_CODES = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter",
                     "json_invalid": "invalid_json"}


def validation_error(err: RequestValidationError) -> ApiError:
    """The first problem of a request that failed validation, as a 400."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    loc = [p for p in loc if p not in _TYPE_TAGS and not p.startswith(_TYPE_TAG_PREFIXES) and not p[:1].isupper()] or loc
    param = ".".join(loc) or None
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first["type"] == "json_invalid":
        message, param = "We could not parse the JSON body of your request.", None
    else:
        message = f"{param}: {first['msg']}" if param else first["msg"]
    return ApiError(400, message, param=param, code=_VALIDATION_CODES.get(first["type"], "invalid_value"))


def install_error_handlers(app: FastAPI, translate=None) -> None:
    """Answer every error of `app` in OpenAI's shape. `translate(exc) -> ApiError | None` maps an
    app's own exception types (e.g. the engine's UnknownModel) before falling back to a 500."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return validation_error(err).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code)
        return JSONResponse(error_body(str(err.detail), "invalid_request_error", None, code),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        mapped = translate(err) if translate is not None else None
        if mapped is None:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            mapped = server_error(err)
        return mapped.response()


async def send_error(send, err: ApiError) -> None:
    """Answer an ASGI request with `err` directly (for middleware that runs before routing)."""
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
