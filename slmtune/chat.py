"""Talk to a base model or a fine-tuned run.

    slmtune chat runs/quickstart --prompt "How do I reset my Lumo?"
    slmtune chat smollm2-135m-instruct            # interactive; empty line or Ctrl-D quits

Generation (slmtune/generation.py, the path serving uses too) streams text and stops at the
model's end-of-turn token.
"""

from __future__ import annotations

import sys
from typing import Callable

from slmtune.generation import SamplingParams, chat_prompt_ids, complete
from slmtune.training.rundir import load_for_inference


def generate_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
                   on_text: Callable[[str], None] | None = None) -> str:
    """Greedy (temperature 0) or sampled reply to a conversation; streams text pieces to on_text."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
    [reply] = complete(model, tokenizer, [chat_prompt_ids(tokenizer, messages)], params, on_text=on_text)
    return reply.text.strip()


def chat(target: str, prompt: str | None = None, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.0) -> None:
    model, tokenizer = load_for_inference(target)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def say(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt is not None:
        generate_reply(model, tokenizer, history + [{"role": "user", "content": prompt}],
                       max_new_tokens=max_new_tokens, temperature=temperature, on_text=say)
        say("\n")
        return
    print("Chatting with", target, "- empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        history.append({"role": "user", "content": user})
        say("model> ")
        reply = generate_reply(model, tokenizer, history, max_new_tokens=max_new_tokens,
                               temperature=temperature, on_text=say)
        say("\n")
        history.append({"role": "assistant", "content": reply})
