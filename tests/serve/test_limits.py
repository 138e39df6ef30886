"""Bounds on what one client may ask of the shared server (#16): every oversize or malformed request
is a 400 with an OpenAI-shaped error, decided before the engine does any work."""

from __future__ import annotations

import time

import pytest

from slmtune.serve.engine import SamplingParams
from tests.serve.test_serve import HELLO, http


@pytest.mark.parametrize("body,param", [
    ({"seed": 2**80}, "seed"),
    ({"seed": -(2**64)}, "seed"),
    ({"stop": ["x" * 257]}, "stop"),
])
def test_bad_sampling_values_are_400s(served, body, param):
    status, out = http(served, "POST", "/v1/chat/completions",
                       {"model": served.base_name, "messages": HELLO, "max_tokens": 4} | body)
    assert status == 400 and param in out["error"]["param"], out


def test_a_64_bit_seed_is_accepted(served):
    status, out = http(served, "POST", "/v1/chat/completions",
                       {"model": served.base_name, "messages": HELLO, "max_tokens": 2, "seed": 2**63 - 1})
    assert status == 200, out


def test_completions_take_a_bounded_number_of_prompts(served):
    from slmtune.serve.app import MAX_PROMPTS

    status, out = http(served, "POST", "/v1/completions",
                       {"model": served.base_name, "prompt": ["hi"] * (MAX_PROMPTS + 1), "max_tokens": 1})
    assert status == 400 and out["error"]["param"] == "prompt"


def test_a_huge_prompt_is_refused_before_it_is_tokenized(served):
    """Megabytes of prompt: refused by length at once (tokenizing it would take seconds)."""
    from slmtune.serve.engine import MAX_CHARS_PER_TOKEN

    size = served.engine.context_length * MAX_CHARS_PER_TOKEN + 1
    started = time.perf_counter()
    status, out = http(served, "POST", "/v1/chat/completions",
                       {"model": served.base_name, "messages": [{"role": "user", "content": "a " * size}]})
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - started < 5


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def endless(tiny_llama_dir):
    """A server whose model never ends a turn (no end-of-turn ids): only max_tokens or a cancel stops it."""
    from slmtune.serve.app import create_app
    from slmtune.serve.engine import Engine
    from tests.serve.conftest import ServerThread

    engine = Engine.load(str(tiny_llama_dir), batch_wait_ms=10, max_batch_size=8)
    engine.eos_ids = set()
    server = ServerThread(create_app(engine)).start()
    yield server, engine
    server.stop()
    engine.stop()


def test_an_abandoned_non_streamed_request_stops_generating(endless):
    import httpx2 as httpx

    server, engine = endless
    body = {"model": engine.base_name, "messages": HELLO, "n": 8, "max_tokens": 480}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)  # the client hangs up
    left = time.monotonic()
    assert wait_until(lambda: engine.stats()["requests"] == 8, timeout=30)  # the 8 rows were finished
    assert time.monotonic() - left < 1.5
    assert engine.stats()["generated_tokens"] < 8 * 480


def test_stop_cancels_generation_in_flight(endless):
    """Shutdown (SIGTERM) does not wait for long generations: rows in flight finish at once."""
    server, engine = endless
    request = engine.chat_request(engine.base_name, HELLO, SamplingParams(temperature=0, max_tokens=480))
    engine.submit(request)
    assert wait_until(lambda: request.completion_tokens > 0, timeout=30)
    started = time.monotonic()
    engine.stop()
    assert request.done.is_set() and time.monotonic() - started < 1.5
    assert request.completion_tokens < 480
