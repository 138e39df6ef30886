"""The one generation path (slmtune/generation.py) against transformers' and PEFT's own `generate`:
plain models, LoRA adapters, and the virtual tokens of prompt and prefix tuning."""

from __future__ import annotations

import pytest
import torch

from slmtune.generation import SamplingParams, chat_prompt_ids, complete
from slmtune.models import end_of_turn_ids, load_model

QUESTIONS = ["Hi", "What is the capital of France? Tell me", "hello world", "Batteries last how long?"]


def reference(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' (or PEFT's) greedy generate for one prompt, the end-of-turn token included."""
    eos = end_of_turn_ids(model, tokenizer)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()[:max_new_tokens]


def peft_model(model, kind: str):
    import peft

    torch.manual_seed(3)
    if kind == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    elif kind == "prefix_tuning":
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    else:
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                 init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # learned-looking virtual tokens, so they change the answers
        for name, p in wrapped.named_parameters():
            if p.requires_grad and kind != "lora":
                p.normal_(0, 1.0)
    return wrapped.eval()


@pytest.mark.parametrize("kind", [None, "lora", "prompt_tuning", "prefix_tuning"])
def test_batched_completions_equal_generate_row_by_row(kind, tiny_llama_dir, tiny_tokenizer):
    model = load_model(str(tiny_llama_dir)).eval()
    if kind is not None:
        model = peft_model(model, kind)
    prompts = [chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    got = complete(model, tiny_tokenizer, prompts, SamplingParams(max_tokens=12, temperature=0), batch_size=4)
    for prompt, completion in zip(prompts, got):
        expected = reference(model, tiny_tokenizer, prompt, 12)
        assert completion.token_ids == expected, kind
        assert completion.finish_reason == ("stop" if expected[-1] in end_of_turn_ids(model, tiny_tokenizer)
                                            else "length")


def test_virtual_tokens_change_the_answer(tiny_llama_dir, tiny_tokenizer):
    """The check above would pass trivially if the virtual tokens were ignored on both sides."""
    base = load_model(str(tiny_llama_dir)).eval()
    prompt = [chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": QUESTIONS[1]}])]
    plain = complete(base, tiny_tokenizer, prompt, SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    for kind in ("prompt_tuning", "prefix_tuning"):
        tuned = peft_model(load_model(str(tiny_llama_dir)).eval(), kind)
        assert complete(tuned, tiny_tokenizer, prompt, SamplingParams(max_tokens=12, temperature=0))[0].token_ids != plain


def test_streamed_text_is_the_completion_text(tiny_llama_dir, tiny_tokenizer):
    model = load_model(str(tiny_llama_dir)).eval()
    pieces = []
    prompt = chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    [c] = complete(model, tiny_tokenizer, [prompt], SamplingParams(max_tokens=16, temperature=0),
                   on_text=pieces.append)
    assert "".join(pieces) == c.text and c.completion_tokens == len(c.token_ids) > 0


def test_seeded_sampling_repeats(tiny_llama_dir, tiny_tokenizer):
    model = load_model(str(tiny_llama_dir)).eval()
    prompt = chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7)
    first = complete(model, tiny_tokenizer, [prompt, prompt], params)
    again = complete(model, tiny_tokenizer, [prompt], params)
    assert first[0].token_ids == first[1].token_ids == again[0].token_ids


@pytest.mark.parametrize("kind", [None, "lora", "prefix_tuning"])
def test_rows_sharing_a_prompt_share_its_prefill_and_answer_as_if_alone(kind, tiny_llama_dir, tiny_tokenizer):
    """GRPO's groups: several samples of each prompt in one batch, one prefill per distinct prompt."""
    model = load_model(str(tiny_llama_dir)).eval()
    if kind is not None:
        model = peft_model(model, kind)
    prompts = [chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS[:2]]
    rows = [p for p in prompts for _ in range(3)]
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in range(len(rows))]
    together = complete(model, tiny_tokenizer, rows, params, batch_size=len(rows))
    for prompt, param, completion in zip(rows, params, together):
        [alone] = complete(model, tiny_tokenizer, [prompt], param)
        assert completion.token_ids == alone.token_ids, kind
    assert len({tuple(c.token_ids) for c in together}) > 2  # the seeds differ, so do the samples
