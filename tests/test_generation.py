"""The one generation path (slmtune/generation.py) against transformers' and PEFT's own `generate`:
plain models, LoRA adapters, and the virtual tokens of prompt and prefix tuning."""

from __future__ import annotations

import pytest
import torch

from slmtune.generation import (Completion, Decoding, SamplingParams, TorchDecoder, chat_prompt_ids, complete,
                                detokenizer, pad_id_of)
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


def joining_rows(tiny_tokenizer, model, schedule: dict[int, list[Completion]], first: list[Completion],
                 mixed: bool = False, adapter_of=lambda c: None):
    """Decode `first`, handing the decoder schedule[k] as joiners at its k-th call of join."""
    eos = end_of_turn_ids(model, tiny_tokenizer)
    decode = detokenizer(tiny_tokenizer)
    calls = []

    def row(c):
        c.on_text = None
        return Decoding(c, decode, eos, adapter=adapter_of(c))

    def join():
        calls.append(1)
        return [row(c) for c in schedule.get(len(calls), [])]

    rows = [row(c) for c in first]
    TorchDecoder(model, pad_id_of(tiny_tokenizer, eos), mixed).decode(rows, join)
    assert len(calls) >= max(schedule)  # every scheduled row joined while the batch ran


@pytest.mark.parametrize("kind", [None, "lora"])
def test_rows_joining_a_running_batch_answer_as_if_alone(kind, tiny_llama_dir, tiny_tokenizer):
    """Continuous batching: rows that join between steps (prompts longer and shorter than the
    running rows', two with one prompt, greedy and seeded) get exactly the tokens they get alone,
    and the rows already running are not changed by them."""
    model = load_model(str(tiny_llama_dir)).eval()
    if kind is not None:
        model = peft_model(model, kind)
    prompts = [chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    asks = [(prompts[0], SamplingParams(max_tokens=14, temperature=0)),
            (prompts[1], SamplingParams(max_tokens=9, temperature=0)),
            (prompts[2], SamplingParams(max_tokens=12, temperature=1.0, seed=5)),
            (prompts[1], SamplingParams(max_tokens=11, temperature=0.8, seed=6)),
            (prompts[1], SamplingParams(max_tokens=8, temperature=0)),
            (prompts[3], SamplingParams(max_tokens=6, temperature=0))]
    alone = [complete(model, tiny_tokenizer, [p], q)[0].token_ids for p, q in asks]
    fresh = [Completion(list(p), q, q.max_tokens) for p, q in asks]
    joining_rows(tiny_tokenizer, model, {2: fresh[2:4], 4: fresh[4:5], 5: fresh[5:]}, fresh[:2])
    assert [c.token_ids for c in fresh] == alone, kind
    assert all(c.finish_reason in ("stop", "length") for c in fresh)


def test_a_row_that_cannot_join_fails_alone(tiny_llama_dir, tiny_tokenizer):
    model = load_model(str(tiny_llama_dir)).eval()
    prompt = chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    greedy = SamplingParams(max_tokens=10, temperature=0)
    [alone] = complete(model, tiny_tokenizer, [prompt], greedy)
    running = Completion(list(prompt), greedy, 10)
    poisoned = Completion(list(prompt), SamplingParams(max_tokens=5, temperature=1.0, seed=2**80), 5)
    good = Completion(list(prompt), greedy, 10)
    joining_rows(tiny_tokenizer, model, {2: [poisoned, good]}, [running])
    assert "Overflow" in str(poisoned.error) and not poisoned.token_ids
    assert running.token_ids == good.token_ids == alone.token_ids and running.error is None


def test_a_mixed_adapter_batch_takes_rows_of_its_adapters_and_the_base(tiny_llama_dir, tiny_tokenizer):
    import peft

    model = peft_model(load_model(str(tiny_llama_dir)).eval(), "lora")
    torch.manual_seed(4)
    model.add_adapter("other", peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                               target_modules="all-linear", init_lora_weights=False))
    prompts = [chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    asks = [("default", prompts[0], 12), ("other", prompts[1], 10), ("__base__", prompts[2], 9),
            ("other", prompts[3], 7), ("default", prompts[1], 8)]
    alone = []
    for name, prompt, n in asks:
        if name == "__base__":
            with model.disable_adapter():
                alone.append(complete(model, tiny_tokenizer, [prompt], SamplingParams(max_tokens=n, temperature=0))[0])
        else:
            model.set_adapter(name)
            alone.append(complete(model, tiny_tokenizer, [prompt], SamplingParams(max_tokens=n, temperature=0))[0])
    assert len({tuple(c.token_ids) for c in alone}) == len(asks)  # the adapters really differ
    fresh = [Completion(list(p), SamplingParams(max_tokens=n, temperature=0), n) for _, p, n in asks]
    adapter = {id(c): name for c, (name, _, _) in zip(fresh, asks)}
    joining_rows(tiny_tokenizer, model, {1: fresh[2:4], 3: fresh[4:]}, fresh[:2], mixed=True,
                 adapter_of=lambda c: adapter[id(c)])
    assert [c.token_ids for c in fresh] == [c.token_ids for c in alone]


def test_a_batch_that_rows_keep_joining_does_not_grow_its_cache(tiny_llama_dir, tiny_tokenizer):
    """Rows of 5 tokens join at every step for 40 steps: the batch never empties, yet the cache
    (the attention mask's width) stays about one row's prompt + answer wide, since columns no
    remaining row attends to are dropped."""
    model = load_model(str(tiny_llama_dir)).eval()
    widths = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["attention_mask"].shape[1])
        if kwargs.get("attention_mask") is not None else None, with_kwargs=True)
    prompts = [chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    decode = detokenizer(tiny_tokenizer)
    greedy = SamplingParams(max_tokens=5, temperature=0)
    made = []

    def row():
        made.append(Completion(list(prompts[len(made) % len(prompts)]), greedy, 5))
        return Decoding(made[-1], decode, eos_ids=set())

    TorchDecoder(model, pad_id_of(tiny_tokenizer, {0})).decode([row()], lambda: [row()] if len(made) < 40 else [])
    assert len(made) == 40 and all(c.completion_tokens == 5 for c in made)
    assert max(widths) <= max(map(len, prompts)) + 6, max(widths)


class FailingConstraint:
    def mask(self, logits):
        raise RuntimeError("constraint broke")

    def accept(self, token):
        pass


def test_a_row_failing_mid_batch_fails_alone(tiny_llama_dir, tiny_tokenizer):
    """A joiner whose constraint raises at its first token (after the batch's rows produced
    theirs) fails by itself; a tiny temperature decodes greedily instead of overflowing."""
    model = load_model(str(tiny_llama_dir)).eval()
    prompt = chat_prompt_ids(tiny_tokenizer, [{"role": "user", "content": "hello"}])
    greedy = SamplingParams(max_tokens=10, temperature=0)
    [alone] = complete(model, tiny_tokenizer, [prompt], greedy)
    running = Completion(list(prompt), greedy, 10)
    broken = Completion(list(prompt), greedy, 10, constraint=FailingConstraint())
    tiny = Completion(list(prompt), SamplingParams(max_tokens=10, temperature=1e-300, seed=1), 10)
    joining_rows(tiny_tokenizer, model, {2: [broken, tiny]}, [running])
    assert "constraint broke" in str(broken.error) and not broken.token_ids
    assert running.token_ids == tiny.token_ids == alone.token_ids and running.error is None
