"""Bounds on what one client may ask of the shared server (#16): every oversize or malformed request
is a 400 with an OpenAI-shaped error, decided before the engine does any work."""

from __future__ import annotations

import time

import pytest

import httpx2 as httpx

from slmtune.serve.app import MAX_PROMPTS, create_app
from slmtune.serve.engine import MAX_CHARS_PER_TOKEN, Engine, FairQueue, Request, SamplingParams
from tests.conftest import build_model
from tests.serve.conftest import ServerThread, http_json
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
    status, out = http(served, "POST", "/v1/completions",
                       {"model": served.base_name, "prompt": ["hi"] * (MAX_PROMPTS + 1), "max_tokens": 1})
    assert status == 400 and out["error"]["param"] == "prompt"


def test_a_huge_prompt_is_refused_before_it_is_tokenized(served):
    """Megabytes of prompt: refused by length at once (tokenizing it would take seconds)."""
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


LONG = 4000  # tokens: a full answer of this length takes many seconds even for the tiny model


@pytest.fixture
def endless(tmp_path, tiny_tokenizer):
    """A server whose model never ends a turn (no end-of-turn ids) and has room for LONG tokens:
    only max_tokens or a cancel stops it."""
    model = build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id,
                        tiny_tokenizer.pad_token_id, max_positions=LONG + 512)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    engine = Engine.load(str(tmp_path), batch_wait_ms=10, max_batch_size=8)
    engine.eos_ids = set()
    server = ServerThread(create_app(engine)).start()
    yield server, engine
    server.stop()
    engine.stop()


def test_an_abandoned_non_streamed_request_stops_generating(endless):
    """The client hangs up after half a second: its 8 rows end long before their LONG tokens
    (the invariant is the token count, not a wall-clock bound, so a loaded machine cannot fail it)."""
    server, engine = endless
    body = {"model": engine.base_name, "messages": HELLO, "n": 8, "max_tokens": LONG}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.5)  # the client hangs up
    assert wait_until(lambda: engine.stats()["requests"] == 8, timeout=120)  # the 8 rows were finished
    assert engine.stats()["generated_tokens"] < 8 * LONG / 4


def test_stop_cancels_generation_in_flight(endless):
    """Shutdown (SIGTERM) does not wait for long generations: rows in flight finish at once."""
    server, engine = endless
    request = engine.chat_request(engine.base_name, HELLO, SamplingParams(temperature=0, max_tokens=LONG))
    engine.submit(request)
    assert wait_until(lambda: request.completion_tokens > 0, timeout=30)
    engine.stop()
    assert request.done.is_set()
    assert request.completion_tokens < LONG / 4


def test_the_queue_takes_owners_in_turn():
    queue = FairQueue()
    rows = [Request(prompt_ids=[1], params=SamplingParams(), max_tokens=1, owner=o) for o in "AAAAB"]
    for r in rows:
        queue.put(r)
    queue.put("control")
    assert queue.qsize() == 6
    assert queue.get() == "control"  # stop/wake first
    assert [queue.get().owner for _ in range(5)] == ["A", "B", "A", "A", "A"]
    with pytest.raises(Exception):
        queue.get_nowait()


def test_one_owners_flood_does_not_hold_back_anothers_request(endless):
    """Owner A queues 16 rows at once, then B one: B is decoded in the first batches, not after A's 16."""
    _, engine = endless
    engine.max_batch_size = 2
    finished: list[str] = []

    def request(owner):
        return engine.chat_request(engine.base_name, HELLO, SamplingParams(temperature=0, max_tokens=16),
                                   owner=owner, on_done=lambda r: finished.append(r.owner))

    flood = [request("A") for _ in range(16)]
    other = request("B")
    for r in flood + [other]:
        engine.submit(r)
    assert other.done.wait(60) and all(r.done.wait(120) for r in flood)
    assert finished.index("B") <= 3, finished  # FIFO would have made it the 17th


def test_another_owners_request_joins_a_batch_full_of_long_replies(endless):
    """Continuous batching with fair shares: A's two long replies fill a batch of size 2; B's short
    request joins it beyond that size (B holds less than its share) and is answered while A's rows
    are still far from their end."""
    _, engine = endless
    engine.max_batch_size = 2
    long = [engine.chat_request(engine.base_name, HELLO, SamplingParams(temperature=0, max_tokens=LONG), owner="A")
            for _ in range(2)]
    for r in long:
        engine.submit(r)
    assert wait_until(lambda: all(r.completion_tokens > 0 for r in long), timeout=60)
    short = engine.chat_request(engine.base_name, HELLO, SamplingParams(temperature=0, max_tokens=8), owner="B")
    engine.submit(short)
    assert short.done.wait(60) and short.error is None and short.completion_tokens == 8
    assert not any(r.done.is_set() for r in long) and all(r.completion_tokens < LONG for r in long)
    assert engine.stats()["joined_running_batch"] == 1
    for r in long:
        r.cancelled = True
    assert all(r.done.wait(60) for r in long)


def test_an_owners_tokens_in_flight_are_bounded(endless):
    """One owner's unfinished requests may hold max_tokens_per_owner tokens (prompt + max_tokens):
    beyond it a 429 (rate_limit_error) for that owner only; finished requests give the room back."""
    import threading

    server, engine = endless
    engine.max_tokens_per_owner = LONG
    held = threading.Event()
    release = threading.Event()

    def hold(text):  # runs on the engine thread: the first request stays in flight until released
        held.set()
        release.wait(60)

    first = engine.chat_request(engine.base_name, HELLO, SamplingParams(temperature=0, max_tokens=LONG - 100),
                                owner="127.0.0.1", on_text=hold)  # the HTTP client's owner: its address
    engine.submit(first)
    assert held.wait(60)
    body = {"model": engine.base_name, "messages": HELLO, "max_tokens": 200}
    status, out = http_json(server.url + "/v1/chat/completions", body=body)
    assert status == 429 and out["error"]["type"] == "rate_limit_error", out
    assert out["error"]["code"] == "rate_limit_exceeded" and str(LONG) in out["error"]["message"]
    other = engine.chat_request(engine.base_name, HELLO, SamplingParams(temperature=0, max_tokens=200), owner="B")
    engine.submit(other)  # another owner is not affected
    first.cancelled = True
    release.set()
    assert first.done.wait(60) and other.done.wait(60) and other.completion_tokens == 200
    assert wait_until(lambda: engine.stats()["tokens_in_flight"] == 0, timeout=60)
    status, out = http_json(server.url + "/v1/chat/completions", body=body | {"max_tokens": 4})
    assert status == 200, out


def test_a_request_larger_than_the_whole_budget_is_a_400(endless):
    """It could never run, so it is not a 429 that clients would retry."""
    server, engine = endless
    engine.max_tokens_per_owner = 100
    status, out = http_json(server.url + "/v1/chat/completions",
                            body={"model": engine.base_name, "messages": HELLO, "max_tokens": 200})
    assert status == 400 and out["error"]["code"] == "request_too_large", out
    assert engine.stats()["tokens_in_flight"] == 0
