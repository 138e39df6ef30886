"""The one generation path: batched decoding on a KV cache, for serving, evaluation, chat and the
export parity checks alike.

    completions = complete(model, tokenizer, [prompt_ids, ...], SamplingParams(max_tokens=64, temperature=0))
    print(completions[0].text, completions[0].finish_reason)

Pieces, each used by every caller:
- `Completion`: one prompt and, as decoding goes, its generated tokens and text.
- `Decoding`: a row being decoded: detokenizes as it grows, streams text that is final (no partial
  UTF-8 character, no possible start of a stop string), and ends the row at end of turn, a stop
  string, max_tokens or when the caller cancels it.
- `Decoder`: the backend protocol: `decode(rows, join)` advances every row to its end, taking in
  rows that `join` hands it between steps. `TorchDecoder` is the PyTorch one (left-padded prefill,
  one forward pass per token over the rows still running, per-row sampling, finished rows leave the
  batch and the cache, joining rows enter it, mixed LoRA adapters per row); the ONNX backend
  (slmtune/serve/onnx_engine.py: a generator per row, so rows join and each may name its adapter)
  and the llama.cpp one (one row at a time, never joining) implement the same protocol.
- `TokenConstraint`: what a row may generate next (a Completion's `constraint`); `GrammarConstraint`
  is the llguidance one (a Lark grammar with embedded JSON schemas: forced tool calls). TorchDecoder
  masks each constrained row's logits before choosing, Decoding tells the constraint what was chosen.
- `complete(...)` / `complete_with(decoder, ...)`: prompts -> completions in batches, grouped by
  length; what eval, chat and the parity checks use.
  The serving engine (slmtune/serve/engine.py) drives decoders itself to batch concurrent requests.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from slmtune.data.tools import template_messages, tool_style, uses_tools
from slmtune.methods.peft_common import prompt_learning_config, unwrap
from slmtune.models import end_of_turn_ids

log = logging.getLogger("slmtune.generation")


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: the caller's default (the serving engine clips it to the context)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


GREEDY = SamplingParams(temperature=0.0)
# Below this temperature a row decodes greedily: the distribution is a point mass to float precision,
# and dividing logits by, say, 1e-300 would overflow them to inf (NaN probabilities).
GREEDY_BELOW = 1e-4


def samples(params: SamplingParams) -> bool:
    """Whether a row with these parameters samples (else it takes the most likely token)."""
    return params.temperature >= GREEDY_BELOW


class TokenConstraint(Protocol):
    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (one row's, over the vocabulary) of tokens not allowed next to -inf, in place."""

    def accept(self, token: int) -> None:
        """The token chosen for this row."""


class GrammarError(ValueError):
    """A grammar llguidance cannot compile (the message says why)."""


@functools.lru_cache(maxsize=4)
def llguidance_tokenizer(tokenizer, eos_ids: tuple[int, ...]):
    # Building it scans the whole vocabulary (~1 s for 50k tokens): once per tokenizer.
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=list(eos_ids))


class GrammarConstraint:
    """Constrained decoding with llguidance: the row can only generate text of the Lark grammar
    (`%json {schema}` rules match JSON documents of a schema), then an end-of-turn token."""

    BIT_SHIFTS = torch.arange(32, dtype=torch.int32)

    def __init__(self, lark: str, tokenizer, eos_ids: set[int]):
        ll_tokenizer = llguidance_tokenizer(tokenizer, tuple(sorted(eos_ids)))
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer)
        if error:
            raise GrammarError(error)
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        self.eos_ids = sorted(eos_ids)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, len(tokenizer))

    def mask(self, logits: torch.Tensor) -> None:
        if self.matcher.is_error():  # cannot happen for tokens it allowed; end the row rather than loop
            logits.fill_(float("-inf"))
            logits[self.eos_ids] = 0.0
            return
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # Unpacked here (one bit per token id) rather than with llguidance's helper, which goes
        # through torch.compile: seconds of compiling on a CPU for a mask of a few thousand words.
        allowed = ((self.bitmask[0][:, None] >> self.BIT_SHIFTS) & 1).flatten().bool()
        n = min(len(allowed), logits.shape[-1])
        # A model's vocabulary may be padded past the tokenizer's: those ids are never allowed.
        logits[n:] = float("-inf")
        logits[:n].masked_fill_(~allowed[:n].to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)


@dataclass(eq=False)
class Completion:
    """One prompt to complete; decoding fills in the rest."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: generation stops after this many tokens
    on_text: Callable[[str], None] | None = None  # called with each new piece of final text
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids, the end-of-turn token included
    finish_reason: str | None = None  # "stop" (end of turn or stop string) or "length"
    cancelled: bool = False  # set by the caller when nobody waits for the answer any more
    error: BaseException | None = None
    constraint: TokenConstraint | None = None  # what may be generated (forced tool calls); TorchDecoder only

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        """Generated tokens, the end-of-turn token included (as OpenAI counts them)."""
        return len(self.token_ids)


def notify(callback, *args) -> None:
    """Run a caller's callback; its failure (e.g. its event loop is gone) never stops decoding."""
    if callback is not None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001
            log.debug("generation callback failed", exc_info=True)


def detokenizer(tokenizer) -> Callable[[list[int]], str]:
    # No clean-up of spaces: it rewrites earlier text (" ." -> ".") after it was streamed.
    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return decode


class Decoding:
    """A completion being decoded: detokenizes one row as it grows and decides when it is finished."""

    def __init__(self, completion: Completion, detokenize: Callable[[list[int]], str], eos_ids: set[int],
                 adapter: str | None = None, on_end: Callable[[Completion], None] | None = None):
        self.completion = completion
        self.adapter = adapter  # the PEFT adapter of this row in a mixed batch (None: the base model)
        # Called once the row is finished, while the rest of its batch may still be decoding: the
        # serving engine answers that request then, not when the batch ends.
        self.on_end = on_end
        self.detokenize = detokenize
        self.eos_ids = eos_ids
        self.tokens: list[int] = []  # generated ids without the end-of-turn token
        self.sent = 0  # characters of the text already handed to on_text
        # A row cancelled before it starts still ends through add() (on_end then answers it).
        self.finished = False

    def add(self, token: int) -> None:
        """The next generated token (any value for a cancelled row, which only finishes it)."""
        c = self.completion
        if self.finished:
            return
        if c.cancelled:
            self.finish("stop", c.text)
            return
        c.token_ids.append(token)
        if c.constraint is not None:
            c.constraint.accept(token)
        if token in self.eos_ids:
            self.finish("stop", self.detokenize(self.tokens))
            return
        self.tokens.append(token)
        text = self.detokenize(self.tokens)
        stops = c.params.stop
        if stops:
            # Only the tail can contain a stop string that the last token completed.
            start = max(0, self.sent - max(map(len, stops)))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                self.finish("stop", text[: min(hits)])
                return
        if c.completion_tokens >= c.max_tokens:
            self.finish("length", text)
            return
        self._emit(text[: self._safe_length(text)])

    def finish(self, reason: str, text: str | None = None) -> None:
        """End the row: emit the rest of `text` (default: everything decoded so far)."""
        self._emit(self.detokenize(self.tokens) if text is None else text)
        self.completion.finish_reason = reason
        self.finished = True
        notify(self.on_end, self.completion)

    def fail(self, error: BaseException) -> None:
        """End the row with an error (it could not start); the rest of its batch goes on."""
        self.completion.error = error
        self.finished = True
        notify(self.on_end, self.completion)

    def _safe_length(self, text: str) -> int:
        """How much of the text can be streamed now: not a trailing partial UTF-8 character (it
        decodes as U+FFFD until its last byte arrives), not the start of a possible stop string."""
        n = len(text)
        while n > self.sent and text[n - 1] == "\ufffd":
            n -= 1
        for stop in self.completion.params.stop:
            for k in range(min(len(stop) - 1, n), 0, -1):
                if text[n - k : n] == stop[:k]:
                    n -= k
                    break
        return max(n, self.sent)

    def _emit(self, text: str) -> None:
        if len(text) > self.sent:
            piece = text[self.sent :]
            self.sent = len(text)
            self.completion.text += piece
            notify(self.completion.on_text, piece)


class Decoder(Protocol):
    def decode(self, rows: list[Decoding], join: Callable[[], list[Decoding]] | None = None) -> None:
        """Generate until every row is finished. `join`, where given, is asked between steps for
        rows to add to the running batch; a backend that cannot add rows never calls it."""


class RowSampler:
    """One row's next-token choice with its own temperature/top_p and seeded generator, so rows with
    different sampling parameters share one forward pass."""

    def __init__(self, params: SamplingParams, device):
        self.temperature = params.temperature
        self.top_p = params.top_p
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


class TorchDecoder:
    """Decode rows on a PyTorch causal LM: prefill the left-padded prompts in one forward pass, then
    one forward pass per new token over the rows still running, on a KV cache. A finished row leaves
    the batch and the cache at once, so a long reply never makes short ones pay for its steps, and
    each row can carry its own LoRA adapter (PEFT's mixed-batch forward: `mixed=True` and each row's
    `Decoding.adapter`). New rows can join a running batch between two steps (`decode(rows, join)`,
    continuous batching): they are prefilled on their own and their cache is appended to the
    batch's, so a request that arrives while long replies are being written starts at once instead
    of waiting for them. For one request it is as fast as transformers' `generate`: on a CPU the
    forward pass itself is the cost (docs/benchmarks.md). Prompt- and prefix-tuned models get their
    virtual tokens at prefill, as PEFT's own generate gives them."""

    def __init__(self, model, pad_id: int, mixed: bool = False):
        self.model = model
        self.pad_id = pad_id
        self.mixed = mixed

    @torch.inference_mode()
    def decode(self, rows: list[Decoding], join: Callable[[], list[Decoding]] | None = None) -> None:
        batch = self._start(rows)
        # Joining appends caches row-wise; models whose cache is not one plain tensor per layer
        # (sliding-window layers, PEFT's virtual tokens) finish their batch first instead.
        joinable = join is not None and prompt_learning_config(self.model) is None and batch.cache_is_plain()
        while batch is not None:
            batch.advance()
            if joinable:
                joined = self._start_joiners(join())
                if joined is not None:
                    batch = joined if batch.empty else batch.merge(joined)
            if batch.empty:
                return

    def _start_joiners(self, rows: list[Decoding]) -> "_Batch | None":
        """Prefill rows joining a running batch; rows that cannot start (a bad seed, say) fail alone
        and the batch they were joining goes on."""
        if not rows:
            return None
        try:
            return self._start(rows)
        except Exception as err:  # noqa: BLE001 - another client's rows are running in this batch
            if len(rows) > 1:
                started = [b for b in (self._start_joiners([row]) for row in rows) if b is not None]
                return functools.reduce(_Batch.merge, started) if started else None
            log.warning("a row could not join the batch: %s", err)
            rows[0].fail(err)
            return None

    def _start(self, rows: list[Decoding]) -> "_Batch":
        """Prefill `rows` and return them as a batch whose next tokens are ready to choose."""
        model = self.model
        completions = [row.completion for row in rows]
        device = next(model.parameters()).device
        width = max(c.prompt_tokens for c in completions)
        names = [row.adapter for row in rows]
        # Rows with the same prompt (and adapter) share one prefill, whose cache is then copied to
        # each: GRPO samples 8 answers per prompt, and on a CPU prefilling 32 rows of ~100 tokens
        # cost as much as decoding 30 tokens for all of them. Virtual-token models prefill every row.
        firsts: dict[tuple, int] = {}
        if prompt_learning_config(model) is None:
            source = [firsts.setdefault((tuple(c.prompt_ids), n), len(firsts)) for c, n in zip(completions, names)]
        else:
            source = list(range(len(rows)))
            firsts = {(tuple(c.prompt_ids), i): i for i, c in enumerate(completions)}
        unique = [completions[source.index(k)] for k in range(len(firsts))]
        # Left padding: every row's last prompt token sits in the last column, where generation starts.
        input_ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(unique), width), dtype=torch.long)
        for i, c in enumerate(unique):
            input_ids[i, width - c.prompt_tokens :] = torch.tensor(c.prompt_ids)
            attention_mask[i, width - c.prompt_tokens :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        samplers = [RowSampler(c.params, device) if samples(c.params) else None for c in completions]
        # A mixed batch names each row's adapter (PEFT's mixed-batch LoRA forward).
        mixed = {"adapter_names": [names[source.index(k)] or "__base__" for k in range(len(unique))]} if self.mixed else {}
        # Without padding (one request, or prompts of one length) no mask is needed, and attention
        # takes its causal fast path instead of building a mask every step.
        padded = any(c.prompt_tokens < width for c in completions)
        logits, attention_mask, next_position, cache, forward, padded = self._prefill(
            input_ids, attention_mask, padded, mixed)
        if len(unique) < len(rows):
            index = torch.tensor(source, device=device)
            cache.batch_select_indices(index)
            logits, attention_mask, next_position = logits[index], attention_mask[index], next_position[index]
        if mixed:
            mixed["adapter_names"] = [n or "__base__" for n in names]
        return _Batch(list(rows), samplers, cache, logits, attention_mask, next_position, forward, padded, mixed)

    def _prefill(self, input_ids, attention_mask, padded: bool, mixed: dict):
        """The first forward pass over the prompts. Returns the last position's logits, the attention
        mask and next positions to continue with, the cache, the callable that runs later steps and
        whether masks must be passed."""
        model = self.model
        # Positions count real tokens only, so a padded row sees the positions it would see alone.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=unwrap(model).config)
        virtual = prompt_learning_config(model)
        if virtual is None:
            logits = model(input_ids=input_ids, attention_mask=attention_mask if padded else None,
                           position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1,
                           **mixed).logits[:, -1, :]
            return logits, attention_mask, positions[:, -1:] + 1, cache, model, padded
        # Virtual tokens (PEFT prompt learning) come before the prompt; later steps run the base model.
        base, n = unwrap(model), virtual.num_virtual_tokens
        attention_mask = torch.cat([attention_mask.new_ones((len(input_ids), n)), attention_mask], dim=1)
        # Positions count the virtual tokens too, as PEFT's forward (which ignores position_ids for
        # prompt learning) numbers them in training and generation.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if virtual.peft_type == "PREFIX_TUNING":
            # Learned keys/values of the n virtual tokens fill the cache before the prompt.
            cache = model.get_prompt(batch_size=len(input_ids))
            positions = positions[:, n:]
            logits = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
            return logits, attention_mask, positions[:, -1:] + 1, cache, base, True
        # Prompt tuning: learned embeddings are the first n input positions.
        embeds = base.get_input_embeddings()(input_ids)
        prompts = model.get_prompt(batch_size=len(input_ids)).to(embeds.dtype)
        logits = base(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=attention_mask,
                      position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        return logits, attention_mask, positions[:, -1:] + 1, cache, base, True


class _Batch:
    """The rows a TorchDecoder is advancing, with their state on the model: the KV cache, attention
    mask, next positions and the logits of each row's next token."""

    def __init__(self, rows, samplers, cache, logits, attention_mask, next_position, forward, padded, mixed):
        self.rows, self.samplers, self.cache = rows, samplers, cache
        self.logits, self.attention_mask, self.next_position = logits, attention_mask, next_position
        self.forward, self.padded, self.mixed = forward, padded, mixed

    @property
    def empty(self) -> bool:
        return not self.rows

    def cache_is_plain(self) -> bool:
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def advance(self) -> None:
        """Choose every row's next token, drop the rows that finished, run the others one step."""
        logits, rows = self.logits, self.rows
        for b, row in enumerate(rows):
            if row.completion.constraint is not None:
                self._guard(row, row.completion.constraint.mask, logits[b])
        tokens = logits.argmax(-1)
        for b, sampler in enumerate(self.samplers):
            if sampler is not None and not rows[b].finished:
                tokens[b] = self._guard(rows[b], sampler, logits[b], default=0)
        for b, token in enumerate(tokens.tolist()):
            self._guard(rows[b], rows[b].add, token)
        keep = [b for b, row in enumerate(rows) if not row.finished]
        if len(keep) < len(rows):
            self._select(keep)
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)]
        if not self.rows:
            return
        if self.padded:
            self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(self.rows), 1))], 1)
        self.logits = self.forward(input_ids=tokens[:, None], attention_mask=self.attention_mask if self.padded else None,
                                   position_ids=self.next_position, past_key_values=self.cache, use_cache=True,
                                   **self.mixed).logits[:, -1, :]
        self.next_position = self.next_position + 1

    @staticmethod
    def _guard(row: Decoding, step: Callable, value, default=None):
        """One row's part of a step; if it fails (a constraint in error, a sampler fed NaN), that
        row fails alone and the others, perhaps other clients' rows, go on."""
        if row.finished:
            return default
        try:
            return step(value)
        except Exception as err:  # noqa: BLE001
            log.warning("a row failed while decoding: %s", err)
            row.fail(err)
            return default

    def _select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.logits.device)
        if keep:
            self.cache.batch_select_indices(index)
        self.logits, self.attention_mask = self.logits[index], self.attention_mask[index]
        self.next_position = self.next_position[index]
        self.rows = [self.rows[b] for b in keep]
        self.samplers = [self.samplers[b] for b in keep]
        if self.mixed:
            self.mixed["adapter_names"] = [self.mixed["adapter_names"][b] for b in keep]
        if keep:
            self._trim()

    def _trim(self) -> None:
        """Drop leading cache columns no remaining row attends to (padding of rows that left, or
        that joined later): a batch that rows keep joining would otherwise grow by one column per
        step for as long as it lives."""
        if not self.padded or not self.cache_is_plain():
            return
        used = self.attention_mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        self.attention_mask = self.attention_mask[:, first:]

    def full_mask(self) -> torch.Tensor:
        """The attention mask over the whole cache (an unpadded batch does not keep one)."""
        length = self.cache.get_seq_length()
        if self.padded:
            return self.attention_mask
        return self.attention_mask.new_ones((len(self.rows), length))

    def merge(self, other: "_Batch") -> "_Batch":
        """This batch with `other`'s rows appended. Caches of different lengths are left-padded to
        the longer one (masked out, as prompt padding is); positions stay each row's own."""
        mine, theirs = self.full_mask(), other.full_mask()
        width = max(mine.shape[1], theirs.shape[1])
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([left_pad(a.keys, width, dim=-2), left_pad(b.keys, width, dim=-2)])
            a.values = torch.cat([left_pad(a.values, width, dim=-2), left_pad(b.values, width, dim=-2)])
        self.attention_mask = torch.cat([left_pad(mine, width, dim=1), left_pad(theirs, width, dim=1)])
        self.padded = True
        self.logits = torch.cat([self.logits, other.logits])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.rows = self.rows + other.rows
        self.samplers = self.samplers + other.samplers
        if self.mixed:
            self.mixed["adapter_names"] = self.mixed["adapter_names"] + other.mixed["adapter_names"]
        self._trim()
        return self


def left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def pad_id_of(tokenizer, eos_ids: set[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)


@contextlib.contextmanager
def generating(model, amp_dtype: torch.dtype | None = None):
    """Generate from a model that is training: eval mode (its mode restored after), no gradients, and
    with `amp_dtype` the training's autocast (a bf16 frozen base with fp32 adapters)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                             enabled=amp_dtype is not None):
            yield
    finally:
        model.train(was_training)


def complete(model, tokenizer, prompts: Sequence[list[int]],
             params: SamplingParams | Sequence[SamplingParams] = GREEDY, *,
             batch_size: int = 8, eos_ids: set[int] | None = None, on_text: Callable[[str], None] | None = None,
             on_batch: Callable[[], None] | None = None) -> list[Completion]:
    """Complete every prompt (token ids) with a PyTorch model; see complete_with."""
    eos_ids = eos_ids if eos_ids is not None else end_of_turn_ids(model, tokenizer)
    return complete_with(TorchDecoder(model, pad_id_of(tokenizer, eos_ids)), tokenizer, prompts, params,
                         batch_size=batch_size, eos_ids=eos_ids, on_text=on_text, on_batch=on_batch)


def complete_with(decoder: Decoder, tokenizer, prompts: Sequence[list[int]],
                  params: SamplingParams | Sequence[SamplingParams] = GREEDY, *, eos_ids: set[int],
                  batch_size: int = 8, on_text: Callable[[str], None] | None = None,
                  on_batch: Callable[[], None] | None = None) -> list[Completion]:
    """Complete every prompt (token ids) with `params` (one for all, or one per prompt: e.g. seeds of
    the samples of a group) through `decoder`, `batch_size` rows at a time, and return the completions
    in prompt order. Prompts are grouped by length to waste little on padding. `max_tokens` defaults
    to 256; `on_text` streams the text (use it with one prompt); `on_batch` is called after each
    batch (progress bars)."""
    decode = detokenizer(tokenizer)
    each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(each) != len(prompts):
        raise ValueError(f"{len(each)} sampling params for {len(prompts)} prompts")
    completions = [Completion(list(p), q, q.max_tokens if q.max_tokens is not None else 256, on_text=on_text)
                   for p, q in zip(prompts, each)]
    order = sorted(range(len(completions)), key=lambda i: -completions[i].prompt_tokens)
    for at in range(0, len(order), batch_size):
        rows = [Decoding(completions[i], decode, eos_ids) for i in order[at : at + batch_size]]
        if any(completions[i].max_tokens > 0 for i in order[at : at + batch_size]):
            decoder.decode(rows)
        for row in rows:
            if not row.finished:
                row.finish("length")
        notify(on_batch)
    return completions


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """A conversation rendered with the model's chat template, ready for the assistant's answer; a
    model without a chat template continues the last message's plain text. With tools (or tool
    calls and results in the conversation), as slmtune.data.tools renders them for training."""
    if tokenizer.chat_template:
        extra = {}
        if uses_tools(messages, tools):
            clean, tools = template_messages(messages, tools, tool_style(tokenizer))
            extra = {"tools": tools} if tools else {}
        else:
            clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        return list(tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, **extra)["input_ids"])
    return list(tokenizer(messages[-1]["content"])["input_ids"])
