"""The generation engine: one thread owns the model and runs queued requests in batches.

    engine = Engine.load("smollm2-135m-instruct", adapters={"support": "runs/quickstart"}).start()
    request = engine.chat_request("support", [{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=32))
    print(engine.generate(request).text)

Requests wait in a queue. The engine thread takes the first one, waits `batch_wait_ms` for more
(everything that queued up while the previous batch ran is taken at once) and runs them as one
left-padded batch through a plain decode loop on a KV cache. Requests for different LoRA adapters
(and the base) share that batch through PEFT's mixed-batch forward when they can all be loaded at
once; otherwise (more adapters than the cap, DoRA) each adapter gets a batch of its own.
Per-request temperature, top_p and seed are applied row by row, and per-request stop conditions
(end of turn, max_tokens, stop strings, a client that went away) end a row, which then leaves the
batch, so requests with different sampling parameters still share the forward passes.
Text reaches the caller through callbacks run on the engine thread (`on_text`, `on_done`).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from slmtune.serve.adapters import AdapterError, AdapterRegistry, UnknownModel

log = logging.getLogger("slmtune.serve")


class RequestError(ValueError):
    """A request the engine cannot run as asked (too long for the context, bad messages...)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: the engine's default, clipped to the context window
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(eq=False)
class Request:
    """One completion to generate; the engine fills in the result fields and sets `done`."""

    model: str  # the base model's name or a registered adapter name
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int = 0  # resolved by Engine.make_request
    on_text: Callable[[str], None] | None = None  # called on the engine thread with each new piece
    on_done: Callable[["Request"], None] | None = None  # called on the engine thread at the end
    text: str = ""
    completion_tokens: int = 0  # generated tokens, the end-of-turn token included (as OpenAI counts)
    finish_reason: str | None = None  # "stop" (end of turn or stop string) or "length"
    error: BaseException | None = None
    cancelled: bool = False  # set by the caller when nobody waits for the answer any more
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _call(callback, *args) -> None:
    # A caller's callback failing (e.g. its event loop is gone) must never take the engine down.
    if callback is not None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001
            log.debug("request callback failed", exc_info=True)


class _Row:
    """Detokenizes one row as it grows and decides when it is finished."""

    def __init__(self, request: Request, decode: Callable[[list[int]], str], eos_ids: set[int]):
        self.request = request
        self.decode = decode
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already handed to on_text
        self.finished = request.cancelled

    def add(self, token: int) -> None:
        req = self.request
        if self.finished:
            return
        if req.cancelled:
            self._finish("stop", self.request.text)
            return
        req.completion_tokens += 1
        if token in self.eos_ids:
            self._finish("stop", self.decode(self.tokens))
            return
        self.tokens.append(token)
        text = self.decode(self.tokens)
        stops = req.params.stop
        if stops:
            # Only the tail can contain a stop string that the last token completed.
            start = max(0, self.sent - max(map(len, stops)))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                self._finish("stop", text[: min(hits)])
                return
        if req.completion_tokens >= req.max_tokens:
            self._finish("length", text)
            return
        self._emit(text[: self._safe_length(text)])

    def _safe_length(self, text: str) -> int:
        """How much of the text can be streamed now: not a trailing partial UTF-8 character (it
        decodes as U+FFFD until its last byte arrives), not the start of a possible stop string."""
        n = len(text)
        while n > self.sent and text[n - 1] == "\ufffd":
            n -= 1
        for stop in self.request.params.stop:
            for k in range(min(len(stop) - 1, n), 0, -1):
                if text[n - k : n] == stop[:k]:
                    n -= k
                    break
        return max(n, self.sent)

    def _emit(self, text: str) -> None:
        if len(text) > self.sent:
            piece = text[self.sent :]
            self.sent = len(text)
            self.request.text += piece
            _call(self.request.on_text, piece)

    def _finish(self, reason: str, text: str) -> None:
        self._emit(text)
        self.request.finish_reason = reason
        self.finished = True


class _RowSampler:
    """One request's next-token choice: greedy, or its own temperature/top_p with a seeded generator,
    so requests with different sampling parameters share one forward pass."""

    def __init__(self, params: SamplingParams, device):
        self.temperature = params.temperature
        self.top_p = params.top_p
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    def __call__(self, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p.
            drop = sorted_probs.cumsum(0) - sorted_probs >= self.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


_WAKE = object()  # queued to make the engine thread look at the registry (an adapter was removed)
_STOP = object()


class Engine:
    """Owns the model on one thread; `submit` requests from anywhere."""

    def __init__(self, model, tokenizer, registry: AdapterRegistry, *, base_name: str, max_batch_size: int = 8,
                 batch_wait_ms: float = 10.0, default_max_tokens: int = 512):
        from slmtune.models import end_of_turn_ids

        self.tokenizer = tokenizer
        self.registry = registry
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.default_max_tokens = default_max_tokens
        self.eos_ids = end_of_turn_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", None) or 2048)
        self.created = int(time.time())
        self._queue: queue.Queue = queue.Queue()
        # HTTP handlers encode while the engine thread decodes; a fast tokenizer used from two
        # threads at once can fail with "Already borrowed", and the lock costs microseconds.
        self._tokenizer_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._batch_sizes: Counter[int] = Counter()
        self._requests = 0
        self._generated_tokens = 0

    @classmethod
    def load(cls, base: str, adapters: dict[str, str] | None = None, *, base_name: str | None = None,
             max_loaded_adapters: int = 4, dtype: str = "float32", **kwargs) -> "Engine":
        """Load the base model once and register (not load) the given adapters.

        dtype: "float32", "bfloat16", or "auto" (bfloat16 where the hardware has native bf16 matmuls)."""
        from slmtune.models import has_native_bf16, load_model, load_tokenizer

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
        return cls(model, tokenizer, registry, base_name=base_name, **kwargs)

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
        if self.running:
            self._queue.put(_STOP)
            self._thread.join(timeout)
        self._thread = None

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
    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            with self._tokenizer_lock:
                encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                             return_dict=True)
        except Exception as err:  # jinja raises TemplateError for conversations the template refuses
            raise RequestError(f"the model's chat template rejected these messages: {err}", param="messages") from err
        return list(encoded["input_ids"])

    def encode_text(self, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, tokens: list[int]) -> str:
        # No clean-up of spaces: it rewrites earlier text (" ." -> ".") after it was streamed.
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

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
        if not self.running:
            raise RuntimeError("the engine is not running; call start()")
        self._queue.put(request)
        return request

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
        with self._stats_lock:
            return {
                "requests": self._requests,
                "batches": sum(self._batch_sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                "max_batch_size_seen": max(self._batch_sizes, default=0),
                "generated_tokens": self._generated_tokens,
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
                groups.setdefault(req.model, []).append(req)
            if len(groups) > 1 and self._run_mixed(batch):
                continue
            for name, requests in groups.items():
                self._run_group(name, requests)

    def _run_mixed(self, requests: list[Request]) -> bool:
        """Run requests for several adapters (and the base) as one batch; False when they cannot be
        mixed, and the caller then runs one batch per adapter."""
        live = [r for r in requests if not r.cancelled]
        names = [None if r.model == self.base_name else r.model for r in live]
        try:
            with self.registry.use_mixed(names) as mixed:
                if mixed is None:
                    return False
                for r in requests:
                    if r.cancelled:
                        self._finish(r)
                model, adapter_names = mixed
                self._guarded(live, lambda: self._generate(model, [_Row(r, self.decode, self.eos_ids) for r in live],
                                                            adapter_names=adapter_names))
        except (UnknownModel, AdapterError):
            return False  # one batch per adapter reports the error to the requests it concerns
        self._account(live)
        return True

    def _run_group(self, name: str, requests: list[Request]) -> None:
        live = [r for r in requests if not r.cancelled]
        for r in requests:
            if r.cancelled:
                self._finish(r)
        if not live:
            return

        def run():
            with self.registry.use(None if name == self.base_name else name) as model:
                self._generate(model, [_Row(r, self.decode, self.eos_ids) for r in live])

        self._guarded(live, run)
        self._account(live)

    @staticmethod
    def _guarded(live: list[Request], run: Callable[[], None]) -> None:
        try:
            run()
        except (UnknownModel, AdapterError) as err:
            for r in live:
                r.error = err
        except Exception as err:  # noqa: BLE001 - one bad batch must not stop the server
            log.exception("generation failed")
            for r in live:
                r.error = err

    def _account(self, live: list[Request]) -> None:
        with self._stats_lock:
            self._batch_sizes[len(live)] += 1
            self._requests += len(live)
            self._generated_tokens += sum(r.completion_tokens for r in live)
        for r in live:
            if r.error is None and r.finish_reason is None:
                r.finish_reason = "length"
            self._finish(r)

    @torch.inference_mode()
    def _generate(self, model, rows: list[_Row], adapter_names: list[str] | None = None) -> None:
        """Prefill the left-padded prompts in one forward pass, then one forward pass per new token
        over the rows still running, on a KV cache. A finished row leaves the batch and the cache at
        once, so a long reply never makes short ones pay for its steps, and each row can carry its
        own adapter (mixed batches), which `model.generate` offers neither of. For one request it
        is as fast as `generate`: on a CPU the forward pass itself is the cost (docs/benchmarks.md)."""
        from transformers import DynamicCache

        requests = [row.request for row in rows]
        device = next(model.parameters()).device
        width = max(r.prompt_tokens for r in requests)
        # Left padding: every row's last prompt token sits in the last column, where generation starts.
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, width - r.prompt_tokens :] = torch.tensor(r.prompt_ids)
            attention_mask[i, width - r.prompt_tokens :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # Positions count real tokens only, so a padded row sees the positions it would see alone.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        samplers = [_RowSampler(r.params, device) if r.params.temperature > 0 else None for r in requests]
        cache = DynamicCache(config=model.config)
        # A mixed batch names each row's adapter (PEFT's mixed-batch LoRA forward).
        mixed = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
        # Without padding (one request, or prompts of one length) no mask is needed, and attention
        # takes its causal fast path instead of building a mask every step.
        padded = any(r.prompt_tokens < width for r in requests)
        logits = model(input_ids=input_ids, attention_mask=attention_mask if padded else None, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1, **mixed).logits[:, -1, :]
        next_position = positions[:, -1:] + 1
        alive = list(range(len(rows)))  # batch row -> index into rows
        while True:
            tokens = logits.argmax(-1)
            for b, i in enumerate(alive):
                if samplers[i] is not None:
                    tokens[b] = samplers[i](logits[b])
            for b, token in enumerate(tokens.tolist()):
                rows[alive[b]].add(token)
            keep = [b for b, i in enumerate(alive) if not rows[i].finished]
            if not keep:
                return
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention_mask, tokens, next_position = attention_mask[index], tokens[index], next_position[index]
                alive = [alive[b] for b in keep]
                if mixed:
                    mixed["adapter_names"] = [mixed["adapter_names"][b] for b in keep]
            if padded:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(alive), 1))], dim=1)
            logits = model(input_ids=tokens[:, None], attention_mask=attention_mask if padded else None,
                           position_ids=next_position, past_key_values=cache, use_cache=True, **mixed).logits[:, -1, :]
            next_position = next_position + 1

    @staticmethod
    def _finish(request: Request) -> None:
        request.done.set()
        _call(request.on_done, request)


def default_base_name(base: str) -> str:
    """The id clients use for the base model: a catalog name or hub id as given, else the
    directory's (or .gguf file's) name, so no local path shows up in /v1/models."""
    from pathlib import Path

    path = Path(base).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return base
