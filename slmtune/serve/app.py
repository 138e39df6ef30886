"""The HTTP API, shaped like OpenAI's so its clients work unchanged.

    app = create_app(Engine.load("smollm2-135m-instruct", {"support": "runs/quickstart"}))
    uvicorn.run(app, port=8000)     # what `slmtune serve` does

    GET    /v1/models                 the base model and every registered adapter (with "loaded")
    POST   /v1/chat/completions       messages -> reply; "stream": true for server-sent events; `tools`,
                                      `tool_choice`, `parallel_tool_calls` -> `tool_calls` (docs/tools.md)
    POST   /v1/completions            prompt (or a list of prompts) -> continuation
    GET    /admin/adapters            registered adapters, which are loaded
    POST   /admin/adapters            {"name", "path"}: register a run directory or PEFT adapter
    DELETE /admin/adapters/{name}     unregister (and unload) an adapter
    GET    /admin/stats               requests, batch sizes, adapter loads and evictions
    GET    /health, /healthz, /readyz, /metrics   (slmtune/http/health.py)

Routes only translate: they validate the body, build engine Requests and shape the answer.
Errors are always {"error": {"message", "type", "param", "code"}} with OpenAI's status codes.
With an admin token, the /admin routes need `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from slmtune.data.tools import MAX_TOOLS, CallStream, check_messages, check_tools, parse_calls
from slmtune.http.errors import ApiError, error_body, install_error_handlers, server_error
from slmtune.http.health import install_health
from slmtune.serve.adapters import AdapterError, UnknownModel
from slmtune.serve.engine import BudgetExceeded, Engine, Request, RequestError, SamplingParams


# --- request bodies --------------------------------------------------------------------------
# Bounds on one request: the engine is shared by every client.
MAX_PROMPTS = 16  # per /v1/completions request (each with n choices, n <= 8)
MAX_STOP_CHARS = 256


class _Body(BaseModel):
    # Unknown parameters are errors, as with OpenAI: a silently ignored setting is worse.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI: a 64-bit integer
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as it only labels the caller
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value):
        if value:
            raise ValueError("penalties are not supported by this server; leave them at 0")
        return value

    def sampling(self, max_tokens: int | None, index: int) -> SamplingParams:
        # With n > 1 and a seed, each choice gets its own (still reproducible) seed.
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=list(self.stop or []),
            seed=None if self.seed is None else self.seed + index,
        )


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str = Field(max_length=64)
    arguments: str


class ToolCall(_Body):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=256)
    refusal: str | None = None  # echoed back by clients that resend a whole reply; ignored

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        # Chat templates know "system"; "developer" is OpenAI's newer name for the same role.
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None
    tools: list[dict] | None = None  # checked by slmtune.data.tools.check_tools (the training files' rules)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _bounded_prompts(cls, value):
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts per request")
        return value
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None


class ToolUse:
    """A chat request's tools: checked like training files' tools, rendered into the prompt, forced
    (tool_choice "required" or a named function: constrained decoding) and parsed out of the answer."""

    def __init__(self, engine: Engine, tools: list[dict] | None, names: set[str], choice, parallel: bool):
        self.engine = engine
        self.tools = tools or []
        self.names = names  # the offered functions' names
        self.choice = choice
        self.parallel = parallel
        self.offered = bool(self.tools)
        self.parsed = self.offered and choice != "none"
        self.forced = self.offered and (choice == "required" or isinstance(choice, NamedToolChoice))

    @classmethod
    def of(cls, body: ChatCompletionRequest, messages: list[dict], engine: Engine) -> "ToolUse":
        """Check the request's tools, tool_choice and tool messages; raises ApiError (400)."""
        specs: dict[str, dict] = {}
        if body.tools is not None:
            problems, specs = check_tools(body.tools)
            if problems:
                raise ApiError(400, f"tools: {problems[0][1]}", param="tools", code=problems[0][0])
        if body.tool_choice not in (None, "none", "auto") and not body.tools:
            raise ApiError(400, "tool_choice needs `tools`", param="tool_choice")
        if isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name not in specs:
            raise ApiError(400, f"tool_choice names {body.tool_choice.function.name!r}, which is not in `tools`",
                           param="tool_choice")
        called = {"tools": body.tools or [], "messages": [m for m in messages if m["role"] == "tool" or
                                                          m.get("tool_calls")]}
        # Past calls are the client's business (it may have dropped a tool since); only the ids matter.
        problems = [p for p in check_messages(called) if p[0] in ("unknown_tool_call_id", "invalid_arguments")]
        if problems:
            raise ApiError(400, f"messages: {problems[0][1]}", param="messages", code=problems[0][0])
        return cls(engine, body.tools, set(specs), body.tool_choice, body.parallel_tool_calls is not False)

    def constraint(self):
        name = self.choice.function.name if isinstance(self.choice, NamedToolChoice) else None
        return self.engine.call_constraint(self.tools, name)

    def message(self, request: Request) -> tuple[dict, str | None]:
        """The assistant message and finish reason of one generated choice."""
        if not self.parsed:
            return {"role": "assistant", "content": request.text}, request.finish_reason
        content, calls = parse_calls(request.text, self.engine.tool_style, self.names)
        if not calls:
            return {"role": "assistant", "content": request.text}, request.finish_reason
        finish = "tool_calls" if request.finish_reason == "stop" else request.finish_reason
        return {"role": "assistant", "content": content, "tool_calls": self.kept(calls)}, finish

    def kept(self, calls: list[dict]) -> list[dict]:
        return calls if self.parallel else calls[:1]

    def stream(self) -> CallStream | None:
        return CallStream(self.engine.tool_style, self.names) if self.parsed else None


class AdapterBody(_Body):
    name: str
    path: str


# --- metrics ---------------------------------------------------------------------------------
def engine_metrics(engine: Engine) -> list:
    """The engine's counters as Prometheus families (read from Engine.stats() at each scrape)."""
    stats = engine.stats()
    requests = CounterMetricFamily("slmtune_engine_requests", "Generations (rows) finished by the engine")
    requests.add_metric([], stats["requests"])
    tokens = CounterMetricFamily("slmtune_engine_generated_tokens", "Tokens generated by the engine")
    tokens.add_metric([], stats["generated_tokens"])
    batches = CounterMetricFamily("slmtune_engine_batches", "Batches decoded, by their number of rows", labels=["rows"])
    for rows, n in stats["batch_sizes"].items():
        batches.add_metric([rows], n)
    queued = GaugeMetricFamily("slmtune_engine_queued", "Requests waiting for the engine")
    queued.add_metric([], stats["queued"])
    return [requests, tokens, batches, queued]


# --- errors ----------------------------------------------------------------------------------
def engine_error(err: Exception) -> ApiError | None:
    """The engine's own exceptions as API errors (None: not one of them, a server error)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, UnknownModel):
        return ApiError(404, str(err), param="model", code="model_not_found")
    if isinstance(err, BudgetExceeded):
        return ApiError(429, str(err), type="rate_limit_error", code=err.code)
    if isinstance(err, RequestError):
        return ApiError(400, str(err), param=err.param, code=err.code)
    if isinstance(err, AdapterError):
        return ApiError(500, str(err), type="server_error", code="adapter_load_failed")
    return None


def as_api_error(err: Exception) -> ApiError:
    return engine_error(err) or server_error(err)


# --- running requests --------------------------------------------------------------------------
class _Batch:
    """The engine requests behind one HTTP request (n choices x prompts), delivering their events
    into one asyncio queue; engine callbacks hop onto the event loop with call_soon_threadsafe."""

    def __init__(self, engine: Engine, model: str, prompts: list[list[int]], body: _Generation,
                 max_tokens: int | None, owner: str = "", constraints: list | None = None):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.prompts = prompts
        self.requests: list[Request] = []
        for p, prompt_ids in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j
                # Without streaming nobody reads the pieces: waking the event loop for each token
                # would only take the GIL from the engine thread.
                self.requests.append(engine.make_request(
                    model, prompt_ids, body.sampling(max_tokens, index),
                    on_text=self._callback("text", index) if body.stream else None,
                    on_done=self._callback("done", index), owner=owner,
                    constraint=constraints[index] if constraints else None))
        self.engine = engine

    def _callback(self, kind: str, index: int):
        def deliver(value):
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, index, value))
        return deliver

    def submit(self) -> None:
        self.engine.submit_all(self.requests)

    def cancel(self) -> None:
        for r in self.requests:
            r.cancelled = True

    async def wait(self) -> list[Request]:
        remaining = len(self.requests)
        try:
            while remaining:
                kind, _, _ = await self.events.get()
                remaining -= kind == "done"
        except asyncio.CancelledError:
            self.cancel()
            raise
        for r in self.requests:
            if r.error is not None:
                raise r.error
        return self.requests

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(r.completion_tokens for r in self.requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


OWNER_SCOPE_KEY = "slmtune.owner"  # set by a front (the service's ServingGuard: the tenant) before this app


def owner_of(http_request: HttpRequest) -> str:
    """Whose request this is, for the engine's fair queue: the tenant when the service fronts this app,
    else the client's address (one line per client machine)."""
    owner = http_request.scope.get(OWNER_SCOPE_KEY)
    if owner:
        return str(owner)
    client = http_request.client
    return client.host if client else ""


DISCONNECT_POLL_SECONDS = 0.25


async def cancel_on_disconnect(http_request: HttpRequest, batch: _Batch) -> None:
    """Cancel `batch` as soon as its client disconnects (checked every DISCONNECT_POLL_SECONDS)."""
    while not await http_request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    batch.cancel()


def _sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def create_app(engine: Engine, *, admin_token: str | None = None) -> FastAPI:
    """The app serving `engine`; starts the engine thread on startup if it is not running."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Stop the engine on shutdown only if this app started it (an engine may outlive an app).
        started_here = not engine.running
        engine.start()
        yield
        if started_here:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="slmtune", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app, translate=engine_error)

    def require_admin(request: HttpRequest) -> None:
        if admin_token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
            raise ApiError(401, "Admin endpoints need `Authorization: Bearer <admin token>`.",
                           type="invalid_request_error", code="invalid_api_key")

    def model_card(name: str, loaded: bool, parent: str | None = None) -> dict:
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "slmtune",
                "parent": parent, "loaded": loaded}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    install_health(app, {"engine": lambda: None if engine.running else "the engine thread is not running"},
                   lambda: engine_metrics(engine))

    @app.get("/v1/models")
    async def list_models():
        loaded = set(engine.registry.loaded())
        cards = [model_card(engine.base_name, True)]
        cards += [model_card(n, n in loaded, engine.base_name) for n in engine.registry.names()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        try:
            engine.check_model(name)
        except UnknownModel as err:
            raise as_api_error(err) from None
        loaded = name == engine.base_name or name in engine.registry.loaded()
        return model_card(name, loaded, None if name == engine.base_name else engine.base_name)

    def start(body: _Generation, prompts: list[list[int]], max_tokens: int | None,
              http_request: HttpRequest, constraints: list | None = None) -> _Batch:
        try:
            batch = _Batch(engine, body.model, prompts, body, max_tokens, owner_of(http_request), constraints)
            batch.submit()
        except (UnknownModel, RequestError) as err:
            raise as_api_error(err) from None
        return batch

    async def answer(batch: _Batch, shape, http_request: HttpRequest) -> dict:
        # A client that hangs up stops its generation: nobody would read it, and others wait behind it.
        watcher = asyncio.create_task(cancel_on_disconnect(http_request, batch))
        try:
            requests = await batch.wait()
        except (UnknownModel, RequestError, AdapterError) as err:
            raise as_api_error(err) from None
        finally:
            watcher.cancel()
        return {"choices": [shape(i, r) for i, r in enumerate(requests)], "usage": batch.usage()}

    async def stream(batch: _Batch, body: _Generation, meta: dict, piece, closing, opening=None) -> StreamingResponse:
        """Server-sent events: `opening` chunks, text chunks (`piece(index, text)`: a choice or None),
        the closing chunks of each choice as it ends (`closing(index, request)`: a list), usage, [DONE]."""
        # An error before the first token (e.g. an adapter that fails to load) still gets a proper
        # HTTP status, since nothing has been sent yet.
        try:
            first = await batch.events.get()
        except asyncio.CancelledError:
            batch.cancel()
            raise
        if first[0] == "done" and first[2].error is not None:
            batch.cancel()
            raise as_api_error(first[2].error)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            pending, remaining = first, len(batch.requests)
            try:
                for i in range(len(batch.requests) if opening else 0):
                    yield _sse(meta | {"choices": [opening(i)]})
                while remaining:
                    kind, index, value = pending if pending is not None else await batch.events.get()
                    pending = None
                    if kind == "text":
                        choice = piece(index, value)
                        if choice is not None:
                            yield _sse(meta | {"choices": [choice]})
                        continue
                    remaining -= 1
                    if value.error is not None:
                        err = as_api_error(value.error)
                        yield _sse(error_body(err.message, err.type, err.param, err.code))
                        break
                    for choice in closing(index, value):
                        yield _sse(meta | {"choices": [choice]})
                if include_usage:
                    yield _sse(meta | {"choices": [], "usage": batch.usage()})
                yield _sse("[DONE]")
            finally:
                batch.cancel()  # no effect on finished requests; stops generating for a client that left

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: HttpRequest):
        messages = [m.plain() for m in body.messages]
        calls = ToolUse.of(body, messages, engine)
        try:
            prompt = await asyncio.to_thread(engine.encode_chat, messages, body.tools if calls.offered else None)
            constraints = [await asyncio.to_thread(calls.constraint) for _ in range(body.n)] if calls.forced else None
        except RequestError as err:
            raise as_api_error(err) from None
        batch = start(body, [prompt], body.max_completion_tokens or body.max_tokens, http_request, constraints)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "system_fingerprint": None}
        if not body.stream:
            def choice(index, request):
                message, finish = calls.message(request)
                return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}

            return meta | {"object": "chat.completion"} | await answer(batch, choice, http_request)

        streams = [calls.stream() for _ in batch.requests]

        def piece(index, text):
            text = streams[index].feed(text) if streams[index] else text
            return {"index": index, "delta": {"content": text}, "finish_reason": None, "logprobs": None} if text else None

        def closing(index, request):
            out, finish = [], request.finish_reason
            if streams[index]:
                rest, tool_calls = streams[index].finish()
                tool_calls = calls.kept(tool_calls)
                if rest:
                    out.append({"index": index, "delta": {"content": rest}, "finish_reason": None, "logprobs": None})
                if tool_calls:
                    finish = "tool_calls" if finish == "stop" else finish
                    delta = {"tool_calls": [call | {"index": k} for k, call in enumerate(tool_calls)]}
                    out.append({"index": index, "delta": delta, "finish_reason": None, "logprobs": None})
            return out + [{"index": index, "delta": {}, "finish_reason": finish, "logprobs": None}]

        def opening(index):
            return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                    "logprobs": None}

        return await stream(batch, body, meta | {"object": "chat.completion.chunk"}, piece, closing, opening)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: HttpRequest):
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        prompts = [await asyncio.to_thread(engine.encode_text, t) for t in texts]
        batch = start(body, prompts, body.max_tokens, http_request)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": None}

        def choice(index, text, finish):
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

        if not body.stream:
            return meta | await answer(batch, lambda i, r: choice(i, r.text, r.finish_reason), http_request)
        return await stream(batch, body, meta, lambda i, text: choice(i, text, None),
                            lambda i, r: [choice(i, "", r.finish_reason)])

    @app.get("/admin/adapters")
    async def list_adapters(request: HttpRequest):
        require_admin(request)
        return {"object": "list", "data": engine.registry.describe(), "loaded": engine.registry.loaded(),
                "max_loaded": engine.registry.max_loaded}

    @app.post("/admin/adapters", status_code=201)
    async def add_adapter(body: AdapterBody, request: HttpRequest):
        require_admin(request)
        try:
            source = await asyncio.to_thread(engine.add_adapter, body.name, body.path)
        except AdapterError as err:
            code = "adapter_exists" if "already registered" in str(err) else "invalid_adapter"
            raise ApiError(409 if code == "adapter_exists" else 400, str(err), param="path", code=code) from None
        return {"name": source.name, "path": source.given, "adapter_dir": str(source.path), "loaded": False}

    @app.delete("/admin/adapters/{name}")
    async def remove_adapter(name: str, request: HttpRequest):
        require_admin(request)
        try:
            engine.remove_adapter(name)
        except UnknownModel as err:
            raise ApiError(404, f"No adapter named `{name}` is registered.", param="name",
                           code="adapter_not_found") from err
        return {"name": name, "deleted": True}

    @app.get("/admin/stats")
    async def stats(request: HttpRequest):
        require_admin(request)
        return engine.stats()

    return app
