"""The serving engine behind tenant checks: /v1/chat/completions and /v1/completions of the service.

`ServingGuard` wraps the slmtune/serve app (ASGI): it authenticates the key, reads the body's
`model` (a base model or one of the tenant's succeeded fine-tuned models, registered with the
engine on first use) and then hands the request to the serving app unchanged. With no serving app
(the base failed to load; service/app.py retries it) it answers 503; the fine-tuning API stays up.
"""

from __future__ import annotations

import asyncio
import json

from slmtune.http.errors import ApiError, send_error
from slmtune.serve.app import OWNER_SCOPE_KEY
from slmtune.service.core import Service
from slmtune.service.deps import tenant_of

SERVED_PATHS = ("/v1/chat/completions", "/v1/completions")


class ServingGuard:
    def __init__(self, service: Service, inner):  # inner: the serving app, None when the engine failed
        self.service, self.inner = service, inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if self.inner is not None:
                return await self.inner(scope, receive, send)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})  # 1013: try again later
            return
        path = scope["path"]
        if path not in SERVED_PATHS:
            return await send_error(send, ApiError(404, f"Unknown path {path}", code="not_found"))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            tenant = await asyncio.to_thread(tenant_of, self.service, headers.get("authorization"))
        except ApiError as err:
            return await send_error(send, err)
        if self.inner is None:  # the base failed to load (its reason, which may hold paths, is the operator's)
            return await send_error(send, ApiError(
                503, "The serving engine is not available: its base model failed to load and is retried. "
                     "Fine-tuning jobs still run; the operator finds the reason in the server's log and /readyz.",
                type="server_error", code="engine_unavailable"))
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None
        if isinstance(model, str):
            try:
                await asyncio.to_thread(self.service.ensure_served, tenant, model)
            except ApiError as err:
                return await send_error(send, err)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        # The engine's queue is fair by owner: each tenant gets its turn, however many rows another sends.
        await self.inner(scope | {OWNER_SCOPE_KEY: tenant.name}, replay, send)

