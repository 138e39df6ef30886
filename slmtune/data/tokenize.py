"""Turn one example into token ids and next-token targets.

Targets are stored already shifted (`targets[t]` is the token to predict after position t, or -100),
so that packing several examples into one row can never ask one example to predict the next.

Chat examples are rendered with the model's own chat template one message at a time; the tokens
an assistant message adds (its content and the template's end-of-turn marker) are the targets,
everything else (system, user, the assistant header, weight-0 turns) is context only.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmtune.data.formats import preference_parts, preference_tools
from slmtune.data.tools import from_legacy, template_messages, tool_style, uses_tools

IGNORE = -100


class TemplateError(ValueError):
    """The chat template cannot produce learnable assistant turns."""


@dataclass
class Example:
    input_ids: list[int]
    targets: list[int]

    def truncated(self, max_length: int | None) -> "Example":
        if not max_length or len(self.input_ids) <= max_length:
            return self
        return Example(self.input_ids[:max_length], self.targets[:max_length])

    def n_targets(self, max_length: int | None = None) -> int:
        return sum(t != IGNORE for t in self.truncated(max_length).targets)

    def __len__(self) -> int:
        return len(self.input_ids)


def _from_segments(segments: list[tuple[list[int], bool]]) -> Example:
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trainable in segments:
        input_ids.extend(ids)
        labels.extend(ids if trainable else [IGNORE] * len(ids))
    return Example(input_ids, labels[1:] + [IGNORE])


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
    """The conversation as the chat template writes it; messages and tools already through
    slmtune.data.tools.template_messages when the conversation uses tools."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; use the prompt_completion or text format")
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)


def chat_segments(messages: list[dict], tokenizer, tools: list | None = None) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trainable) pieces, in order. With tools, messages
    and tools are first put in the template's tool style (tool_calls trained like content)."""
    if uses_tools(messages, tools):
        messages, tools = template_messages(messages, tools, tool_style(tokenizer))
    pieces: list[tuple[str, bool]] = []
    done = ""

    def advance(upto: str, trainable: bool) -> None:
        nonlocal done
        if not upto.startswith(done):
            raise TemplateError(
                "the chat template renders a conversation differently when a message is added "
                "(it is not prefix-stable), so assistant turns cannot be located for the loss"
            )
        pieces.append((upto[len(done):], trainable))
        done = upto

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            advance(render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools), False)
            advance(render(tokenizer, messages[: i + 1], tools=tools), message.get("weight", 1) != 0)
        elif not (message["role"] == "tool" and i + 1 < len(messages) and messages[i + 1]["role"] == "tool"):
            # Consecutive tool results may share one turn (Qwen2.5 closes it after the last one):
            # they are rendered together.
            advance(render(tokenizer, messages[: i + 1], tools=tools), False)
    return [(text, trainable) for text, trainable in pieces if text]


def encode_chat(messages: list[dict], tokenizer, system_prompt: str | None = None,
                tools: list | None = None) -> Example:
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    return _from_segments([(_ids(tokenizer, text), trainable)
                           for text, trainable in chat_segments(messages, tokenizer, tools)])


def encode_prompt_completion(prompt: str, completion: str, tokenizer) -> Example:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return _from_segments([(_ids(tokenizer, prompt, special=True), False), (_ids(tokenizer, completion) + eos, True)])


def encode_text(text: str, tokenizer) -> Example:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return _from_segments([(_ids(tokenizer, text, special=True) + eos, True)])


@dataclass
class Pair:
    """A preference pair: the same prompt answered twice; targets are the answers' tokens only."""

    chosen: Example
    rejected: Example

    def truncated(self, max_length: int | None) -> "Pair":
        return Pair(self.chosen.truncated(max_length), self.rejected.truncated(max_length))

    def n_targets(self, max_length: int | None = None) -> int:
        """Trainable tokens, 0 when either answer has none (the pair would teach nothing)."""
        chosen, rejected = self.chosen.n_targets(max_length), self.rejected.n_targets(max_length)
        return chosen + rejected if chosen and rejected else 0

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def encode_pair(data: dict, tokenizer, system_prompt: str | None = None) -> Pair:
    """Both answers rendered after the same prompt with the chat template; earlier assistant turns of
    the prompt are context (weight 0), so only each answer's tokens (and its end of turn) are targets."""
    prompt, chosen, rejected = preference_parts(data)
    tools = preference_tools(data)
    context = [m | {"weight": 0} if m["role"] == "assistant" else m for m in prompt]
    return Pair(encode_chat(context + [chosen], tokenizer, system_prompt, tools),
                encode_chat(context + [rejected], tokenizer, system_prompt, tools))


def encode(fmt: str, data: dict, tokenizer, max_length: int | None, system_prompt: str | None = None) -> Example | Pair:
    if fmt == "preference":
        return encode_pair(data, tokenizer, system_prompt).truncated(max_length)
    if fmt == "chat":
        data = from_legacy(data)
        example = encode_chat(data["messages"], tokenizer, system_prompt, data.get("tools"))
    elif fmt == "prompt_completion":
        example = encode_prompt_completion(data["prompt"], data["completion"], tokenizer)
    elif fmt == "text":
        example = encode_text(data["text"], tokenizer)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return example.truncated(max_length)


def check_end_of_turn(messages: list[dict], tokenizer, end_ids: set[int], tools: list | None = None) -> None:
    """Round-trip one conversation through template and tokenizer and make sure every trained
    assistant turn (tool-call turns included) ends with a token that stops generation. Without it the
    fine-tuned model learns never to stop, the classic failure of hand-written templates."""
    example = encode_chat(messages, tokenizer, tools=tools)
    spans: list[list[int]] = []
    previous = IGNORE
    for target in example.targets:
        if target != IGNORE:
            if previous == IGNORE:
                spans.append([])
            spans[-1].append(target)
        previous = target
    if not spans:
        raise TemplateError("no assistant tokens reach the loss in the first example")
    names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(end_ids)) or "(none)"
    for span in spans:
        if not end_ids.intersection(span):
            text = tokenizer.decode(span)
            raise TemplateError(
                f"the chat template does not put an end-of-turn token ({names}) inside the trained assistant "
                f"turn {text[-80:]!r}; the fine-tuned model would never learn to stop. Fix the tokenizer's "
                "chat_template or use the prompt_completion format."
            )
    assistant_texts = [(m.get("content") or "").strip() for m in messages
                       if m["role"] == "assistant" and m.get("weight", 1) != 0 and (m.get("content") or "").strip()]
    decoded = " ".join(tokenizer.decode([t for span in spans for t in span]).split())
    for content in assistant_texts:
        if " ".join(content.split())[:40] not in decoded:
            raise TemplateError(f"assistant content {content[:40]!r} does not survive the template round trip")
