"""The engine without HTTP: stop strings while streaming, and adapters loaded down to none and back."""

from __future__ import annotations

import pytest

from slmtune.serve.adapters import AdapterError, AdapterRegistry, UnknownModel
from slmtune.serve.engine import Engine, Request, SamplingParams, _Row
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
    row = _Row(request, decode, eos_ids={9})
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
