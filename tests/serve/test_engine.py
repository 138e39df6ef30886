"""The engine without HTTP: stop strings while streaming, and adapters loaded down to none and back."""

from __future__ import annotations

import pytest

from slmtune.serve.adapters import AdapterError, AdapterRegistry, UnknownModel
from slmtune.generation import Decoding, pad_id_of
from slmtune.serve.engine import Engine, Request, SamplingParams
from tests.serve.conftest import perturbed_adapter

PIECES = {1: "Hel", 2: "lo E", 3: "ND tail", 4: "\ufffd", 5: "", 9: ""}


def decode(tokens):
    # Tokens 4 and 5 are the bytes of "€": 4 alone decodes to U+FFFD, as byte-level BPE does.
    text = "".join(PIECES[t] for t in tokens)
    return text.replace("\ufffd", "€") if 5 in tokens else text


def run_row(tokens, stop=(), max_tokens=10):
    pieces = []
    request = Request(model="m", prompt_ids=[0], params=SamplingParams(stop=list(stop)), max_tokens=max_tokens,
                      on_text=pieces.append)
    row = Decoding(request, decode, eos_ids={9})
    for t in tokens:
        row.add(t)
    return request, pieces, row.finished


def test_a_stop_string_split_across_tokens_is_never_streamed():
    request, pieces, finished = run_row([1, 2, 3], stop=["END"])
    assert pieces == ["Hel", "lo "] and request.text == "Hello "  # "E" was held back until it could not be "END"
    assert finished and request.finish_reason == "stop" and request.completion_tokens == 3


def test_partial_characters_wait_for_their_last_byte_and_eos_is_counted():
    request, pieces, finished = run_row([1, 4, 5, 9])
    assert pieces == ["Hel", "€"] and "\ufffd" not in request.text
    assert finished and request.finish_reason == "stop" and request.completion_tokens == 4


def test_max_tokens_finishes_with_length():
    request, pieces, finished = run_row([1, 2, 3], max_tokens=2)
    assert request.text == "Hello E" and request.finish_reason == "length" and finished


def test_adapters_unload_down_to_the_plain_base_and_load_again(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    one = perturbed_adapter(tiny_llama_dir, tmp_path / "one", seed=1)
    two = perturbed_adapter(tiny_llama_dir, tmp_path / "two", seed=2)
    engine = Engine.load(str(tiny_llama_dir), {"l": str(one), "two.v2": str(two)}, max_loaded_adapters=1).start()
    try:
        def ask(model):
            request = engine.chat_request(model, [{"role": "user", "content": "hello"}],
                                          SamplingParams(temperature=0, max_tokens=8))
            return engine.generate(request, timeout=60).text

        base, first_one = ask(engine.base_name), ask("l")
        assert ask("two.v2") != first_one and engine.registry.loaded() == ["two.v2"]  # cap 1: "l" went
        assert ask("l") == first_one and engine.stats()["adapter_evictions"] == 2
        engine.remove_adapter("l")
        assert ask(engine.base_name) == base
        assert engine.registry.loaded() == [] and not isinstance(engine.registry.model, PeftModel)
        assert ask("two.v2") != base
        with pytest.raises(UnknownModel):
            engine.chat_request("l", [{"role": "user", "content": "hi"}], SamplingParams())
    finally:
        engine.stop()


def test_an_adapter_that_fails_to_load_evicts_none_of_the_loaded_ones(tiny_llama_dir, tmp_path):
    good = perturbed_adapter(tiny_llama_dir, tmp_path / "good", seed=1)
    broken = perturbed_adapter(tiny_llama_dir, tmp_path / "broken", seed=2)
    engine = Engine.load(str(tiny_llama_dir), {"good": str(good), "broken": str(broken)},
                         max_loaded_adapters=1).start()
    try:
        def ask(model):
            request = engine.chat_request(model, [{"role": "user", "content": "hello"}],
                                          SamplingParams(temperature=0, max_tokens=8))
            return engine.generate(request, timeout=60).text

        first = ask("good")
        # Registered while valid, corrupted on disk afterwards (a half-copied upload, a full disk).
        (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
        with pytest.raises(AdapterError, match="'broken'.*could not be loaded"):
            ask("broken")
        assert engine.registry.loaded() == ["good"] and engine.stats()["adapter_evictions"] == 0
        assert ask("good") == first and engine.stats()["adapter_loads"] == 1  # still loaded: not loaded again
    finally:
        engine.stop()


def test_registration_checks(tiny_llama_dir, tmp_path):
    registry = AdapterRegistry(model=None, base_model=str(tiny_llama_dir))
    with pytest.raises(AdapterError, match="neither a run directory"):
        registry.register("x", tmp_path)
    with pytest.raises(AdapterError, match="name"):
        registry.register("../x", tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="LoRA"):
        registry.register("x", tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "init_lora_weights": "pissa"}')
    with pytest.raises(AdapterError, match="rewrites the base"):
        registry.register("x", tmp_path)
    assert registry.names() == []


def test_one_batch_of_uneven_requests_matches_generate_row_by_row(tiny_llama_dir):
    """The decode loop drops rows as they finish and left-pads prompts: each row's greedy tokens
    must still be exactly those of `model.generate` on that prompt alone."""
    import torch

    engine = Engine.load(str(tiny_llama_dir))
    asks = [("hello", 12), ("a much longer question about the weather in the mountains", 5), ("hi", 9)]
    requests = [engine.chat_request(engine.base_name, [{"role": "user", "content": text}],
                                    SamplingParams(temperature=0, max_tokens=n)) for text, n in asks]
    engine.run_group(engine.base_name, requests)
    assert engine.stats()["batch_sizes"] == {"3": 1}
    model = engine.registry.model
    for request, (_, n) in zip(requests, asks):
        ids = torch.tensor([request.prompt_ids])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=sorted(engine.eos_ids), pad_token_id=pad_id_of(engine.tokenizer, engine.eos_ids))
        expected = out[0, ids.shape[1]:].tolist()
        assert request.completion_tokens == len(expected) and request.finish_reason in ("stop", "length")
        assert request.text == engine.decode([t for t in expected if t not in engine.eos_ids])


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(tiny_llama_dir):
    engine = Engine.load(str(tiny_llama_dir))

    def sampled(seed, mates=0):
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed, max_tokens=10)
        mine = engine.chat_request(engine.base_name, [{"role": "user", "content": "hello"}], params)
        others = [engine.chat_request(engine.base_name, [{"role": "user", "content": f"other {k}"}],
                                      SamplingParams(temperature=0.7, max_tokens=3 + k)) for k in range(mates)]
        engine.run_group(engine.base_name, [mine, *others])
        return mine.text

    alone = sampled(7)
    assert sampled(7, mates=3) == alone and sampled(8) != alone


def test_a_mixed_adapter_batch_gives_each_row_its_own_adapters_output(tiny_llama_dir, tmp_path):
    one = perturbed_adapter(tiny_llama_dir, tmp_path / "one", seed=1)
    two = perturbed_adapter(tiny_llama_dir, tmp_path / "two", seed=2)
    engine = Engine.load(str(tiny_llama_dir), {"one": str(one), "two": str(two)}, max_loaded_adapters=2)
    names = [engine.base_name, "one", "two", "one"]

    def requests():
        return [engine.chat_request(name, [{"role": "user", "content": f"question {i}"}],
                                    SamplingParams(temperature=0, max_tokens=6 + i)) for i, name in enumerate(names)]

    alone = requests()
    for request in alone:
        engine.run_group(request.model, [request])
    mixed = requests()
    assert engine.run_mixed(mixed)
    assert [r.text for r in mixed] == [r.text for r in alone]
    assert len({r.text for r in alone}) == 4  # the adapters really differ
    assert engine.stats()["batch_sizes"] == {"1": 4, "4": 1}
    # Two adapters cannot be loaded at once under a cap of 1: the engine falls back to one batch each.
    engine.registry.max_loaded = 1
    assert not engine.run_mixed(requests())


def test_bfloat16_weights_serve_the_base_and_mixed_adapter_batches(tiny_llama_dir, tmp_path):
    import torch

    one = perturbed_adapter(tiny_llama_dir, tmp_path / "one", seed=1)
    engine = Engine.load(str(tiny_llama_dir), {"one": str(one)}, dtype="bfloat16")
    assert next(engine.registry.model.parameters()).dtype == torch.bfloat16
    requests = [engine.chat_request(name, [{"role": "user", "content": "hello"}],
                                    SamplingParams(temperature=0, max_tokens=6)) for name in (engine.base_name, "one")]
    assert engine.run_mixed(requests)
    assert all(r.error is None and r.completion_tokens > 0 for r in requests)
    assert requests[0].text != requests[1].text


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_exactly_where_the_hardware_has_native_bf16(tiny_llama_dir, monkeypatch, native):
    import torch

    import slmtune.serve.engine

    monkeypatch.setattr(slmtune.serve.engine, "has_native_bf16", lambda device: native)
    engine = Engine.load(str(tiny_llama_dir), dtype="auto")
    assert next(engine.registry.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)


def test_one_poisoned_row_fails_alone_and_its_batch_mates_answer(tiny_llama_dir):
    """A row whose sampler cannot start (a seed beyond 64 bits, which the HTTP layer refuses but
    the engine must survive) fails by itself; the others in its batch answer as if it were absent."""
    engine = Engine.load(str(tiny_llama_dir))

    def ask(text, seed=None):
        return engine.chat_request(engine.base_name, [{"role": "user", "content": text}],
                                   SamplingParams(temperature=0 if seed is None else 1.0, seed=seed, max_tokens=6))

    alone, other_alone = ask("hello"), ask("a question")
    engine.run_group(engine.base_name, [alone])
    engine.run_group(engine.base_name, [other_alone])
    good, poisoned, other = ask("hello"), ask("hi", seed=2**80), ask("a question")
    engine.run_group(engine.base_name, [good, poisoned, other])
    assert isinstance(poisoned.error, ValueError) and poisoned.done.is_set()  # torch refuses the seed
    assert good.error is None and other.error is None
    assert (good.text, other.text) == (alone.text, other_alone.text)
    assert good.finish_reason in ("stop", "length") and other.completion_tokens > 0


def queued(owner, model="m"):
    return Request(model=model, owner=owner, prompt_ids=[1], params=SamplingParams(), max_tokens=1)


@pytest.mark.parametrize("running, waiting, taken", [
    # Room in the batch: anyone's rows join, round-robin by owner.
    ({"a": 2}, ["a", "a", "b", "a"], ["a", "b", "a", "a"]),
    # Full with one owner's rows: another owner joins beyond the size, up to its share (8 // 2).
    ({"a": 8}, ["a", "b", "b", "b", "b", "b"], ["b", "b", "b", "b"]),
    # Three owners: shares of 8 // 3 = 2 rows; c already holds 2.
    ({"a": 6, "c": 2}, ["b", "b", "b", "c", "a"], ["b", "b"]),
    # The hard cap (16 rows) holds whatever the shares.
    ({"a": 15}, ["b", "b"], ["b"]),
])
def test_rows_join_a_running_batch_fairly(running, waiting, taken):
    from collections import Counter

    from slmtune.serve.engine import FairQueue

    queue = FairQueue()
    for owner in waiting:
        queue.put(queued(owner))
    joined = queue.take_joiners(lambda r: True, Counter(running), 8, 16)
    assert [r.owner for r in joined] == taken
    assert queue.qsize() == len(waiting) - len(taken)


def test_nothing_joins_while_another_models_request_waits_first_in_line():
    from collections import Counter

    from slmtune.serve.engine import FairQueue

    queue = FairQueue()
    queue.put(queued("a", model="m"))
    queue.put(queued("b", model="other"))
    assert queue.take_joiners(lambda r: r.model == "m", Counter({"a": 1}), 8, 16) == []
    assert queue.qsize() == 2


def test_a_short_request_joins_a_long_reply_and_finishes_first(tiny_llama_dir):
    """Continuous batching in the engine: a request that arrives while a long reply is being
    written joins that batch, gets the same answer as alone, and ends long before the long one."""
    engine = Engine.load(str(tiny_llama_dir))
    engine.eos_ids = set()  # the long reply runs to max_tokens whatever the random model writes
    alone = engine.chat_request(engine.base_name, [{"role": "user", "content": "hi"}],
                                SamplingParams(temperature=0, max_tokens=5))
    engine.run_group(engine.base_name, [alone])
    engine.start()
    try:
        short = engine.chat_request(engine.base_name, [{"role": "user", "content": "hi"}],
                                    SamplingParams(temperature=0, max_tokens=5), owner="b")
        submitted = []

        def submit_short_once(text):  # runs on the engine thread, after the long reply's first token
            if not submitted:
                submitted.append(engine.submit(short))

        long = engine.chat_request(engine.base_name, [{"role": "user", "content": "a long story please"}],
                                   SamplingParams(temperature=0, max_tokens=400), owner="a",
                                   on_text=submit_short_once)
        engine.submit(long)
        assert short.done.wait(60)
        assert not long.done.is_set(), (long.error, long.finish_reason, long.completion_tokens, engine.stats())
        assert short.error is None and short.text == alone.text
        assert long.done.wait(120) and long.completion_tokens == 400
        assert engine.stats()["joined_running_batch"] == 1
    finally:
        engine.stop()
