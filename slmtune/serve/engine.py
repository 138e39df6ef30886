"""The generation engine: one thread owns the model and runs queued requests in batches.

    engine = Engine.load("smollm2-135m-instruct", adapters={"support": "runs/quickstart"}).start()
    request = engine.chat_request("support", [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))
    print(engine.generate(request).text)

Requests wait in a queue, one line per owner (tenant or client), served round-robin. The engine
thread takes the first one, waits `batch_wait_ms` for more (everything that queued up while the
previous batch ran is taken at once) and runs them as one left-padded batch through a plain decode
loop on a KV cache. While it runs, requests that arrive join it between two decoding steps
(continuous batching): up to `max_batch_size` rows from anyone, and beyond that, up to twice that,
rows of owners holding less than their fair share of the batch, so one client's long replies never
make another's short request wait for them. Requests for different LoRA adapters (and the base)
share that batch through PEFT's mixed-batch forward when they can all be loaded at once; otherwise
(more adapters than the cap, DoRA) each adapter gets a batch of its own, and a request for a model
the running batch cannot take lets that batch drain (no new rows join it) before it runs.
Per-request temperature, top_p and seed are applied row by row, and per-request stop conditions
(end of turn, max_tokens, stop strings, a client that went away) end a row, which then leaves the
batch, so requests with different sampling parameters still share the forward passes.
Text reaches the caller through callbacks run on the engine thread (`on_text`, `on_done`).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from slmtune.data.tools import call_grammar, tool_style
from slmtune.generation import (Completion, Decoder, Decoding, GrammarConstraint, GrammarError, SamplingParams,
                                TorchDecoder, chat_prompt_ids, detokenizer, notify, pad_id_of)
from slmtune.models import end_of_turn_ids, has_native_bf16, load_model, load_tokenizer
from slmtune.serve import DEFAULT_MAX_TOKENS_PER_OWNER
from slmtune.serve.adapters import AdapterError, AdapterRegistry, UnknownModel

__all__ = ["BudgetExceeded", "Engine", "FairQueue", "Request", "RequestError", "SamplingParams", "default_base_name"]

log = logging.getLogger("slmtune.serve")


MAX_CHARS_PER_TOKEN = 32


class RequestError(ValueError):
    """A request the engine cannot run as asked (too long for the context, bad messages...)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class BudgetExceeded(RequestError):
    """An owner's unfinished requests would hold more tokens than it may (HTTP 429)."""


@dataclass(eq=False)
class Request(Completion):
    """A completion one HTTP request (or Python caller) waits for; the engine sets `done` at the end."""

    model: str = ""  # the base model's name or a registered adapter name
    owner: str = ""  # who asked (the service's tenant, else the client's address): the queue is fair by owner
    on_done: Callable[["Request"], None] | None = None  # called on the engine thread at the end
    done: threading.Event = field(default_factory=threading.Event)
    charged: int = 0  # tokens counted against the owner's budget while it is unfinished


class FairQueue:
    """The engine's queue, fair between owners: requests wait in one line per owner, and each get()
    takes the next request of the owner served least recently (round-robin), so a client that sends
    hundreds of rows at once delays another client's request by at most one row per turn instead of
    by all of them. Control items (stop, wake) go first. The interface of queue.Queue the engine uses."""

    def __init__(self):
        self._ready = threading.Condition()
        self._lines: OrderedDict[str, deque] = OrderedDict()  # owner -> its requests, least recently served first
        self._control: deque = deque()

    def put(self, item) -> None:
        with self._ready:
            if isinstance(item, Request):
                self._lines.setdefault(item.owner, deque()).append(item)
            else:
                self._control.append(item)
            self._ready.notify()

    def get(self, timeout: float | None = None):
        with self._ready:
            if not self._ready.wait_for(lambda: self._control or self._lines, timeout):
                raise queue.Empty
            if self._control:
                return self._control.popleft()
            owner, line = next(iter(self._lines.items()))
            item = line.popleft()
            if line:
                self._lines.move_to_end(owner)  # the others' turn first
            else:
                del self._lines[owner]
            return item

    def get_nowait(self):
        return self.get(timeout=0)

    def take_joiners(self, can_join: Callable[[Request], bool], running: Counter, size: int,
                     hard_size: int) -> list[Request]:
        """Requests to add to a batch already running (`running`: its rows per owner), taken in
        round-robin order by owner: any owner's while the batch has fewer than `size` rows; beyond
        that, up to `hard_size`, only an owner's that holds fewer rows than its fair share (`size`
        split evenly among the owners running or waiting), so one owner's long replies filling the
        batch never keep another owner waiting for them to end. Nothing is taken while a request
        that cannot join (another model's) or a control item waits first in line: the batch then
        drains and that request gets its turn."""
        with self._ready:
            if self._control or not self._lines:
                return []
            if any(not can_join(line[0]) and not line[0].cancelled for line in self._lines.values()):
                return []
            share = max(1, size // len(set(running) | set(self._lines)))
            counts, rows, taken = Counter(running), sum(running.values()), []
            progress = True
            while progress and self._lines:
                progress = False
                for owner in list(self._lines):
                    line = self._lines[owner]
                    if line[0].cancelled:  # its client left: taken (to be answered) but holds no row
                        taken.append(line.popleft())
                    elif not can_join(line[0]):
                        continue
                    elif rows < size or (counts[owner] < share and rows < hard_size):
                        taken.append(line.popleft())
                        counts[owner] += 1
                        rows += 1
                    else:
                        continue
                    progress = True
                    if line:
                        self._lines.move_to_end(owner)
                    else:
                        del self._lines[owner]
            return taken

    def qsize(self) -> int:
        with self._ready:
            return len(self._control) + sum(len(line) for line in self._lines.values())


_WAKE = object()  # queued to make the engine thread look at the registry (an adapter was removed)
_STOP = object()


class Engine:
    """Owns the model on one thread; `submit` requests from anywhere.

    `new_decoder(model, mixed)` makes the backend's Decoder for one batch (slmtune/generation.py):
    TorchDecoder for PyTorch models (Engine.load), the ONNX backend's for exports (OnnxEngine.load).
    `constrained_decoding`: the decoders honour Completion.constraint (forced tool calls)."""

    def __init__(self, tokenizer, registry: AdapterRegistry, *, base_name: str, eos_ids: set[int],
                 context_length: int, new_decoder: Callable[[object, bool], Decoder],
                 max_batch_size: int = 8, batch_wait_ms: float = 10.0, default_max_tokens: int = 512,
                 constrained_decoding: bool = False, continuous_batching: bool = True,
                 max_tokens_per_owner: int | None = DEFAULT_MAX_TOKENS_PER_OWNER):
        self.tokenizer = tokenizer
        self.tool_style = tool_style(tokenizer)
        self.constrained_decoding = constrained_decoding
        self.registry = registry
        self.base_name = base_name
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.new_decoder = new_decoder
        self.max_batch_size = max_batch_size
        # Requests join running batches (up to twice max_batch_size rows: fair shares, see FairQueue).
        self.continuous_batching = continuous_batching
        # What one owner's unfinished requests may hold (prompt + max_tokens each): a bound on the
        # queue's memory and on how far ahead one client can book the engine. None: no bound.
        self.max_tokens_per_owner = max_tokens_per_owner
        self._owner_tokens: Counter[str] = Counter()
        self._budget_lock = threading.Lock()
        self.batch_wait = batch_wait_ms / 1000.0
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self._queue = FairQueue()
        # HTTP handlers encode while the engine thread decodes; a fast tokenizer used from two
        # threads at once can fail with "Already borrowed", and the lock costs microseconds.
        self._tokenizer_lock = threading.Lock()
        self._detokenize = detokenizer(tokenizer)
        # Requests are encoded with a copy of their own, so a long prompt never holds the lock the
        # decode loop takes for every token (other tenants' streams would stall behind it).
        self._encoder = copy.deepcopy(tokenizer)
        self._encoder_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._stopping = False
        self._active: list[Request] = []  # the rows being decoded now (stop() cancels them)
        self._batch_sizes: Counter[int] = Counter()
        self._requests = 0
        self._joined = 0  # requests that joined a batch already running
        self._generated_tokens = 0

    @classmethod
    def load(cls, base: str, adapters: dict[str, str] | None = None, *, base_name: str | None = None,
             max_loaded_adapters: int = 4, dtype: str = "float32", **kwargs) -> "Engine":
        """Load the base model once and register (not load) the given adapters.

        dtype: "float32", "bfloat16", or "auto" (bfloat16 where the hardware has native bf16 matmuls)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            # Decoding one token reads every weight once: bf16 halves those bytes. Measured on
            # SmolLM2-135M (docs/benchmarks.md): 2.0x one client, 2.7x sixteen, and 99% of greedy
            # next-token choices equal to float32's.
            dtype = "bfloat16" if has_native_bf16(device) else "float32"
        tokenizer = load_tokenizer(base)
        model = load_model(base, dtype=dtype)
        if device == "cuda":
            model.to("cuda")
        model.eval()
        base_name = base_name or default_base_name(base)
        registry = AdapterRegistry(model, base_model=base, max_loaded=max_loaded_adapters)
        for name, path in (adapters or {}).items():
            registry.register(name, path, reserved={base_name})
        eos_ids = end_of_turn_ids(model, tokenizer)
        pad_id = pad_id_of(tokenizer, eos_ids)
        context_length = int(model.config.max_position_embeddings or 2048)
        return cls(tokenizer, registry, base_name=base_name, eos_ids=eos_ids, context_length=context_length,
                   new_decoder=lambda m, mixed: TorchDecoder(m, pad_id, mixed), constrained_decoding=True,
                   **kwargs)

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        if not self.running:
            self._thread = threading.Thread(target=self._loop, name="slmtune-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30) -> None:
        """Stop within about one decoding step: rows being generated are cancelled (they finish with
        what they have), queued requests are answered as cancelled, nothing new starts."""
        if self.running:
            self._stopping = True
            for r in list(self._active):
                r.cancelled = True
            self._queue.put(_STOP)
            self._thread.join(timeout)
        self._thread = None
        while True:  # requests that arrived after the stop: finished, never left waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Request):
                item.cancelled = True
                self._finish(item)
        self._stopping = False

    # --- models ------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [self.base_name] + self.registry.names()

    def check_model(self, name: str) -> None:
        if name != self.base_name and name not in self.registry:
            raise UnknownModel(name)

    def add_adapter(self, name: str, path: str):
        return self.registry.register(name, path, reserved={self.base_name})

    def remove_adapter(self, name: str):
        source = self.registry.remove(name)
        self._queue.put(_WAKE)  # free its memory now rather than at the next request
        return source

    # --- requests ----------------------------------------------------------------------------
    def check_prompt_size(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing, a prompt too long for the context whatever its tokens (a token
        rarely spans more than MAX_CHARS_PER_TOKEN characters): tokenizing megabytes costs seconds."""
        if chars > self.context_length * MAX_CHARS_PER_TOKEN:
            raise RequestError(f"This model's maximum context length is {self.context_length} tokens; the prompt "
                               f"has {chars} characters, far more than fit.", param=param,
                               code="context_length_exceeded")

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        chars = sum(len(m.get("content") or "") + len(str(m.get("tool_calls") or "")) for m in messages)
        self.check_prompt_size(chars + len(str(tools or "")), "messages")
        try:
            with self._encoder_lock:
                return chat_prompt_ids(self._encoder, messages, tools)
        except Exception as err:  # jinja raises TemplateError for conversations the template refuses
            raise RequestError(f"the model's chat template rejected these messages: {err}", param="messages") from err

    def encode_text(self, prompt: str) -> list[int]:
        self.check_prompt_size(len(prompt), "prompt")
        with self._encoder_lock:
            return list(self._encoder(prompt)["input_ids"])

    def decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self._detokenize(tokens)

    def call_constraint(self, tools: list[dict], name: str | None = None) -> GrammarConstraint:
        """A constraint that makes a row one call (to `name`, else to any of `tools`) with arguments
        valid for the function's schema, written in this model's tool style."""
        if not self.constrained_decoding:
            raise RequestError("tool_choice \"required\" or a named function needs constrained decoding, which "
                               "this backend does not do; serve the PyTorch model, or use tool_choice \"auto\"",
                               param="tool_choice", code="unsupported_parameter")
        try:
            with self._encoder_lock:  # the tokenizer is read whole once (cached): not the decode loop's
                return GrammarConstraint(call_grammar(tools, self.tool_style, name), self._encoder, self.eos_ids)
        except GrammarError as err:
            raise RequestError(f"the tools' parameters cannot be enforced: {err}", param="tools",
                               code="invalid_tools") from err

    def make_request(self, model: str, prompt_ids: list[int], params: SamplingParams, **callbacks) -> Request:
        """Check the model name and the lengths; raises UnknownModel or RequestError."""
        self.check_model(model)
        room = self.context_length - len(prompt_ids)
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            asked = params.max_tokens or 1
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the prompt, {asked} for the completion). "
                "Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded")
        max_tokens = params.max_tokens if params.max_tokens is not None else min(self.default_max_tokens, room)
        return Request(model=model, prompt_ids=list(prompt_ids), params=params, max_tokens=max_tokens, **callbacks)

    def chat_request(self, model: str, messages: list[dict], params: SamplingParams, **callbacks) -> Request:
        return self.make_request(model, self.encode_chat(messages), params, **callbacks)

    def submit(self, request: Request) -> Request:
        self.submit_all([request])
        return request

    def submit_all(self, requests: list[Request]) -> None:
        """Queue the requests of one caller (e.g. the n choices of an HTTP request) all, or none:
        BudgetExceeded when their owner's unfinished requests would then hold more than
        max_tokens_per_owner tokens (prompt + max_tokens of each)."""
        if not self.running:
            raise RuntimeError("the engine is not running; call start()")
        with self._budget_lock:
            for r in requests:
                r.charged = r.prompt_tokens + r.max_tokens
            if self.max_tokens_per_owner is not None:
                for owner in {r.owner for r in requests}:
                    asked = sum(r.charged for r in requests if r.owner == owner)
                    held = self._owner_tokens[owner]
                    if asked > self.max_tokens_per_owner:  # it could never run: not worth a retry
                        for r in requests:
                            r.charged = 0
                        raise RequestError(
                            f"This request needs {asked} tokens (prompts + max_tokens), more than the "
                            f"{self.max_tokens_per_owner} one client may have in flight; lower max_tokens or n.",
                            param="max_tokens", code="request_too_large")
                    if held + asked > self.max_tokens_per_owner:
                        for r in requests:
                            r.charged = 0
                        raise BudgetExceeded(
                            f"This request needs {asked} tokens (prompts + max_tokens) while your unfinished requests "
                            f"hold {held}; at most {self.max_tokens_per_owner} may be in flight at once. Wait for "
                            "them to finish, or lower max_tokens or n.", param=None, code="rate_limit_exceeded")
            for r in requests:
                self._owner_tokens[r.owner] += r.charged
        for r in requests:
            self._queue.put(r)

    def generate(self, request: Request, timeout: float | None = None) -> Request:
        """Submit and wait (for Python callers and tests; the HTTP app uses callbacks)."""
        self.submit(request)
        if not request.done.wait(timeout):
            request.cancelled = True
            raise TimeoutError("generation did not finish in time")
        if request.error is not None:
            raise request.error
        return request

    def stats(self) -> dict:
        with self._budget_lock:
            in_flight = sum(self._owner_tokens.values())
        with self._stats_lock:
            return {
                "requests": self._requests,
                "joined_running_batch": self._joined,
                "batches": sum(self._batch_sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                "max_batch_size_seen": max(self._batch_sizes, default=0),
                "generated_tokens": self._generated_tokens,
                "tokens_in_flight": in_flight,  # prompt + max_tokens of unfinished requests
                "queued": self._queue.qsize(),
                "adapters_loaded": self.registry.loaded(),
                "adapter_loads": self.registry.loads,
                "adapter_evictions": self.registry.evictions,
            }

    # --- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [] if item is _WAKE else [item]
            deadline = time.monotonic() + self.batch_wait
            while batch and len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # finish this batch first, then stop
                    break
                if item is not _WAKE:
                    batch.append(item)
            try:
                self.registry.sync()
            except Exception:  # noqa: BLE001
                log.exception("unloading removed adapters failed")
            groups: dict[str, list[Request]] = {}
            for req in batch:
                req.cancelled = req.cancelled or self._stopping
                groups.setdefault(req.model, []).append(req)
            if len(groups) > 1 and self.run_mixed(batch):
                continue
            # Only the last of these batches takes joiners: an earlier one could keep running on
            # new requests for its model while the others' requests, already taken, wait.
            for i, (name, requests) in enumerate(groups.items()):
                self.run_group(name, requests, joinable=i == len(groups) - 1)

    def _rows(self, requests: list[Request], adapters: dict[str, str] | None = None) -> list[Decoding]:
        """Decoding rows for requests; in a mixed batch, `adapters` maps model names to PEFT's."""
        return [Decoding(r, self.decode, self.eos_ids, adapter=adapters.get(r.model) if adapters else None,
                         on_end=self._answer) for r in requests]

    def _joiner(self, live: list[Request], can_join: Callable[[Request], bool],
                adapters: dict[str, str] | None = None) -> Callable[[], list[Decoding]]:
        """The decoder's `join`: queued requests that may enter the batch running `live` now
        (FairQueue.take_joiners); they are appended to `live`, so stop() and the accounting see them."""

        def join() -> list[Decoding]:
            if self._stopping or not self.continuous_batching:
                return []
            # Answered requests leave `live`: a batch that lives for hours must not hold them all.
            live[:] = [r for r in live if not r.done.is_set()]
            running = Counter(r.owner for r in live if not r.cancelled)
            taken = self._queue.take_joiners(can_join, running, self.max_batch_size, self.max_batch_size * 2)
            for r in taken:
                if r.cancelled:  # its client left while it waited
                    self._finish(r)
            taken = [r for r in taken if not r.cancelled]
            live.extend(taken)
            if self._stopping:  # stop() may have cancelled `live` before these joined it
                for r in taken:
                    r.cancelled = True
            with self._stats_lock:
                self._joined += len(taken)
            return self._rows(taken, adapters)

        return join

    def run_mixed(self, requests: list[Request]) -> bool:
        """Run requests for several adapters (and the base) as one batch; False when they cannot be
        mixed, and the caller then runs one batch per adapter. Requests for the base or an adapter
        of the batch may join it while it runs."""
        live = [r for r in requests if not r.cancelled]
        names = [None if r.model == self.base_name else r.model for r in live]
        try:
            with self.registry.use_mixed(names) as mixed:
                if mixed is None:
                    return False
                for r in requests:
                    if r.cancelled:
                        self._finish(r)
                model, peft_names = mixed
                self._count_batch(len(live))
                adapters = {r.model: p for r, p in zip(live, peft_names)} | {self.base_name: "__base__"}
                ran = self._guarded(live, lambda rows: self.new_decoder(model, True).decode(
                    self._rows(rows, adapters), join=self._joiner(rows, lambda r: r.model in adapters, adapters)))
        except (UnknownModel, AdapterError):
            return False  # one batch per adapter reports the error to the requests it concerns
        self._account(ran)
        return True

    def run_group(self, name: str, requests: list[Request], joinable: bool = True) -> None:
        """Run requests for one model as one batch; more requests for it may join while it runs
        (unless not `joinable`)."""
        live = [r for r in requests if not r.cancelled]
        for r in requests:
            if r.cancelled:
                self._finish(r)
        if not live:
            return

        self._count_batch(len(live))

        def run(rows: list[Request]) -> None:
            with self.registry.use(None if name == self.base_name else name) as model:
                join = self._joiner(rows, lambda r: r.model == name) if joinable else None
                self.new_decoder(model, False).decode(self._rows(rows), join=join)

        self._account(self._guarded(live, run))

    def _guarded(self, live: list[Request], run: Callable[[list[Request]], None]) -> list[Request]:
        """Run a batch; if it fails before any row produced a token, run each row alone, so that one
        bad row (another tenant's, perhaps) fails only itself. Returns every request that ran: `live`
        and those that joined it (run appends them to `live`)."""
        self._active = live
        try:
            run(live)
        except (UnknownModel, AdapterError) as err:
            for r in live:
                if not r.done.is_set():  # an answered request keeps its answer
                    r.error = err
        except Exception as err:  # noqa: BLE001 - one bad batch must not stop the server
            if len(live) > 1 and not any(r.token_ids for r in live):
                return [ran for r in list(live) for ran in self._guarded([r], run)]
            log.exception("generation failed")
            for r in live:
                if not r.done.is_set():
                    r.error = err
        finally:
            self._active = []
        return live

    def _count_batch(self, rows: int) -> None:
        """A batch starts with `rows` rows (rows that join it later count as joined_running_batch)."""
        with self._stats_lock:
            self._batch_sizes[rows] += 1

    def _answer(self, request: Request) -> None:
        """A request's row ended (Decoding.on_end) or its batch did: count it and answer it."""
        if request.done.is_set():
            return
        if request.error is None and request.finish_reason is None:
            request.finish_reason = "length"
        with self._stats_lock:
            self._requests += 1
            self._generated_tokens += request.completion_tokens
        self._finish(request)

    def _account(self, ran: list[Request]) -> None:
        """The batch ended: answer the requests whose row did not end by itself (errors)."""
        for r in ran:
            self._answer(r)

    def _finish(self, request: Request) -> None:
        """Answer a request (done, on_done) once, whether it ran or was cancelled before it could."""
        if request.done.is_set():
            return
        with self._budget_lock:
            self._owner_tokens[request.owner] -= request.charged
            if self._owner_tokens[request.owner] <= 0:
                del self._owner_tokens[request.owner]
            request.charged = 0
        request.done.set()
        notify(request.on_done, request)


def default_base_name(base: str) -> str:
    """The id clients use for the base model: a catalog name or hub id as given, else the
    directory's (or .gguf file's) name, so no local path shows up in /v1/models."""
    path = Path(base).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return base
