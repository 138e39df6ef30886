"""Talk to a base model or a fine-tuned run.

    slmtune chat runs/quickstart --prompt "How do I reset my Lumo?"
    slmtune chat smollm2-135m-instruct            # interactive; empty line or Ctrl-D quits

Generation streams tokens and stops at the model's end-of-turn token.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Callable

import torch

from slmtune.models import end_of_turn_ids, load_model, load_tokenizer


def load_for_inference(target: str):
    """A run directory (base model from its recipe + adapter/) or any model name `models.resolve` takes."""
    run_dir = Path(target)
    if (run_dir / "recipe.yaml").is_file() and (run_dir / "model").is_dir():
        target = str(run_dir / "model")  # full fine-tuning: a complete model
    if (run_dir / "recipe.yaml").is_file() and (run_dir / "adapter").is_dir():
        from slmtune.config import load_recipe

        from slmtune.methods import METHODS

        recipe = load_recipe(run_dir / "recipe.yaml")
        method = METHODS[recipe.method.name]
        tokenizer = load_tokenizer(recipe.model.name)
        # An adapter trained on a quantized base (QLoRA) runs on the same quantized base.
        model = load_model(recipe.model.name, **(method.load_kwargs(recipe.method) if hasattr(method, "load_kwargs") else {}))
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    else:
        tokenizer = load_tokenizer(target)
        model = load_model(target)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate_reply(
    model,
    tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Greedy (temperature 0) or sampled reply to a conversation; streams text pieces to on_text."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    kwargs = dict(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(end_of_turn_ids(model, tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=temperature > 0,
    )
    if temperature > 0:
        kwargs["temperature"] = temperature
    if on_text is None:
        out = model.generate(**kwargs)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate, kwargs=kwargs | {"streamer": streamer}, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        on_text(piece)
    worker.join()
    return "".join(pieces).strip()


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
