"""The OpenAI-compatible server, driven over HTTP with the official `openai` client.

The server is real (uvicorn in a thread, see conftest.py); answers are checked against plain
transformers `generate` on the same tiny model, so "batched", "streamed" and "with an adapter"
are compared with a reference rather than with themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from slmtune.cli import main
from tests.serve.conftest import ServerThread, http_json

HELLO = [{"role": "user", "content": "hello, how are you today?"}]


def reference(model_dir, prompt_ids, max_new_tokens, adapter_dir=None):
    """Greedy generation with plain transformers (+ PEFT): (text, generated token count)."""
    from slmtune.models import end_of_turn_ids, load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    eos = end_of_turn_ids(model, tokenizer)
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)
    return text, len(new)


def chat_ids(served, messages):
    return served.engine.encode_chat(messages)


def http(served, method, path, body=None, raw=None):
    return http_json(served.url + path, method, body, raw)


def greedy(served, model, messages=HELLO, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12} | kwargs
    return served.client().chat.completions.create(model=model, messages=messages, **kwargs)


def test_models_lists_the_base_and_registered_adapters(served):
    ids = [m.id for m in served.client().models.list().data]
    assert ids[0] == served.base_name == served.base_dir.name
    assert set(ids[1:]) >= {"alpha", "beta"} and "gamma" not in ids


def test_chat_equals_transformers_generate_and_counts_tokens(served):
    reply = greedy(served, served.base_name, max_tokens=10)
    prompt_ids = served.engine.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_dict=True)
    prompt_ids = list(prompt_ids["input_ids"])
    text, generated = reference(served.base_dir, prompt_ids, 10)
    assert reply.object == "chat.completion" and reply.model == served.base_name
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("length" if generated == 10 else "stop")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == generated
    assert reply.usage.total_tokens == len(prompt_ids) + generated


def test_stream_concatenates_to_the_non_streamed_answer(served):
    whole = greedy(served, "alpha", max_tokens=16)
    chunks = list(greedy(served, "alpha", max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completions_endpoint(served):
    client = served.client()
    prompt = "The Lumo 3 lamp resets when"
    one = client.completions.create(model=served.base_name, prompt=prompt, max_tokens=8, temperature=0)
    prompt_ids = served.engine.tokenizer(prompt)["input_ids"]
    text, generated = reference(served.base_dir, prompt_ids, 8)
    assert one.object == "text_completion" and one.choices[0].text == text
    assert (one.usage.prompt_tokens, one.usage.completion_tokens) == (len(prompt_ids), generated)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=served.base_name, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert streamed == text
    two = client.completions.create(model="beta", prompt=[prompt, "Batteries last"], max_tokens=5, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens <= 10
    assert two.usage.prompt_tokens == len(prompt_ids) + len(served.engine.tokenizer("Batteries last")["input_ids"])


def test_each_adapter_changes_the_output_exactly_as_peft_does(served):
    ids = chat_ids(served, HELLO)
    answers = {name: greedy(served, name).choices[0].message.content for name in (served.base_name, "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers
    assert answers["alpha"] == reference(served.base_dir, ids, 12, served.adapters["alpha"] / "adapter")[0]
    assert answers["beta"] == reference(served.base_dir, ids, 12, served.adapters["beta"])[0]
    # The base is served from the same weights with the adapters switched off.
    assert answers[served.base_name] == reference(served.base_dir, ids, 12)[0]


def test_unknown_model_is_404_model_not_found_and_paths_are_never_opened(served):
    for name in ("no-such-model", str(served.adapters["gamma"]), "../gamma"):
        with pytest.raises(openai.NotFoundError) as caught:
            greedy(served, name)
        assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
        assert caught.value.param == "model"
    assert "gamma" not in served.engine.registry.loaded()
    status, body = http(served, "POST", "/v1/chat/completions", {"model": "nope", "messages": HELLO})
    assert status == 404
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("params, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 0}, "n"),
    ({"extra_body": {"best_of": 3}}, "best_of"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"max_tokens": 100_000}, "messages"),
])
def test_bad_parameters_are_400_naming_the_parameter(served, params, param):
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().chat.completions.create(model=served.base_name, messages=HELLO, **params)
    assert caught.value.status_code == 400 and caught.value.param == param
    assert caught.value.type == "invalid_request_error"


def test_malformed_bodies_are_400(served):
    status, body = http(served, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = http(served, "POST", "/v1/chat/completions", {"model": served.base_name})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = http(served, "POST", "/v1/chat/completions",
                        {"model": served.base_name, "messages": [{"role": "wizard", "content": "hi"}]})
    assert status == 400 and body["error"]["param"].startswith("messages.0.role")
    status, body = http(served, "GET", "/v1/nothing-here")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_stop_strings_and_seeds(served):
    full = greedy(served, served.base_name, max_tokens=20).choices[0].message.content
    stop = full[5:8]
    cut = greedy(served, served.base_name, max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy(
        served, served.base_name, max_tokens=20, stop=stop, stream=True))
    assert streamed == full[: full.index(stop)]

    def sample(seed, **kw):
        return greedy(served, "beta", temperature=1.0, seed=seed, max_tokens=16, **kw).choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7, top_p=0.3) == sample(7, top_p=0.3)


def test_adapters_load_on_first_use_and_are_evicted_least_recently_used(served):
    registry = served.engine.registry
    status, _ = http(served, "POST", "/admin/adapters", {"name": "gamma", "path": str(served.adapters["gamma"])})
    assert status == 201
    try:
        first_alpha = greedy(served, "alpha").choices[0].message.content
        greedy(served, "beta")
        assert registry.loaded() == ["alpha", "beta"]  # cap 2, least recently used first
        evictions = served.engine.stats()["adapter_evictions"]
        greedy(served, "gamma")
        assert registry.loaded() == ["beta", "gamma"]
        assert served.engine.stats()["adapter_evictions"] == evictions + 1
        _, listing = http(served, "GET", "/admin/adapters")
        assert {a["name"]: a["loaded"] for a in listing["data"]} == {"alpha": False, "beta": True, "gamma": True}
        assert {m.id: m.loaded for m in served.client().models.list().data}["alpha"] is False
        # Reloading an evicted adapter gives the same answers as before.
        assert greedy(served, "alpha").choices[0].message.content == first_alpha
        assert registry.loaded() == ["gamma", "alpha"]
    finally:
        http(served, "DELETE", "/admin/adapters/gamma")


def test_admin_register_and_remove_with_the_cli(served, capsys, tmp_path):
    gamma = str(served.adapters["gamma"])
    assert main(["adapters", "add", "delta.v1", gamma, "--url", served.url]) == 0
    assert "registered delta" in capsys.readouterr().out
    answer = greedy(served, "delta.v1").choices[0].message.content
    assert answer and "delta.v1" in served.engine.registry.loaded()
    assert main(["adapters", "list", "--url", served.url]) == 0
    assert "delta.v1" in capsys.readouterr().out

    # Re-registering a name elsewhere, a bad path, a bad name, another base's run: refused.
    assert main(["adapters", "add", "delta.v1", str(served.adapters["beta"]), "--url", served.url]) == 1
    assert "already registered" in capsys.readouterr().err
    status, body = http(served, "POST", "/admin/adapters", {"name": "x", "path": str(tmp_path / "missing")})
    assert status == 400 and body["error"]["code"] == "invalid_adapter"
    status, body = http(served, "POST", "/admin/adapters", {"name": "a/b", "path": gamma})
    assert status == 400
    status, body = http(served, "POST", "/admin/adapters", {"name": served.base_name, "path": gamma})
    assert status == 400
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    run_dir = tmp_path / "foreign-run"
    (run_dir / "adapter").mkdir(parents=True)
    for f in served.adapters["beta"].iterdir():
        (run_dir / "adapter" / f.name).write_bytes(f.read_bytes())
    recipe = (served.adapters["alpha"] / "recipe.yaml").read_text().replace(str(served.base_dir), str(other_base))
    (run_dir / "recipe.yaml").write_text(recipe)
    status, body = http(served, "POST", "/admin/adapters", {"name": "foreign", "path": str(run_dir)})
    assert status == 400 and "trained on" in body["error"]["message"]

    assert main(["adapters", "remove", "delta.v1", "--url", served.url]) == 0
    with pytest.raises(openai.NotFoundError):
        greedy(served, "delta.v1")
    deadline = time.monotonic() + 10
    while "delta.v1" in served.engine.registry.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "delta.v1" not in served.engine.registry.loaded()  # unloaded, not only forgotten
    assert main(["adapters", "remove", "delta.v1", "--url", served.url]) == 1
    assert "404" in capsys.readouterr().err
    # The name is free again, and now means another adapter.
    assert main(["adapters", "add", "delta.v1", str(served.adapters["beta"]), "--url", served.url]) == 0
    assert greedy(served, "delta.v1").choices[0].message.content == greedy(served, "beta").choices[0].message.content
    assert main(["adapters", "remove", "delta.v1", "--url", served.url]) == 0


def test_an_adapter_that_fails_to_load_is_a_500_and_the_server_carries_on(served, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in served.adapters["beta"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["no_such_proj"]}))
    status, _ = http(served, "POST", "/admin/adapters", {"name": "broken", "path": str(broken)})
    assert status == 201
    try:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as caught:
                result = greedy(served, "broken", stream=stream)
                list(result) if stream else None
            assert caught.value.code == "adapter_load_failed" and "broken" in caught.value.message
        assert greedy(served, "beta").choices[0].message.content
        assert "broken" not in served.engine.registry.loaded()
    finally:
        http(served, "DELETE", "/admin/adapters/broken")


def test_concurrent_requests_are_batched_and_match_sequential_answers(served):
    prompts = [[{"role": "user", "content": f"What is fact number {i}?" + " please" * (i % 3)}] for i in range(8)]
    models = [served.base_name if i % 2 else "alpha" for i in range(8)]
    sequential = [greedy(served, m, p).choices[0].message.content for m, p in zip(models, prompts)]
    before = served.engine.stats()
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        results[i] = greedy(served, models[i], prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.choices[0].message.content for r in results] == sequential
    after = served.engine.stats()
    assert after["requests"] - before["requests"] == 8
    new_batches = after["batches"] - before["batches"]
    assert new_batches < 8  # some requests shared a forward pass
    assert after["max_batch_size_seen"] > 1
    _, stats = http(served, "GET", "/admin/stats")
    assert stats["batch_sizes"] == after["batch_sizes"]


def test_a_client_that_leaves_a_stream_stops_its_generation(served):
    before = served.engine.stats()
    stream = greedy(served, served.base_name, max_tokens=400, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    deadline = time.monotonic() + 30
    while served.engine.stats()["requests"] == before["requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = served.engine.stats()
    assert after["requests"] == before["requests"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 400


def test_admin_token_guards_admin_routes_only(served):
    from slmtune.serve.app import create_app

    guarded = ServerThread(create_app(served.engine, admin_token="s3cret")).start()
    try:
        assert main(["adapters", "list", "--url", guarded.url]) == 1
        assert main(["adapters", "list", "--url", guarded.url, "--admin-token", "s3cret"]) == 0
        from openai import OpenAI

        client = OpenAI(base_url=guarded.url + "/v1", api_key="anything", max_retries=0)
        assert client.models.list().data[0].id == served.base_name
    finally:
        guarded.stop()
    assert served.engine.running  # the engine belongs to the first app; the second did not stop it


def test_slmtune_serve_command(served, tmp_path):
    """The real `slmtune serve` process: flags, startup, one request, adapter listing."""
    from tests.serve.conftest import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "slmtune.cli", "serve", "--model", str(served.base_dir), "--port", str(port),
           "--adapter", f"alpha={served.adapters['alpha']}", "--served-model-name", "tiny",
           "--max-loaded-adapters", "1", "--log-level", "warning"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "SLMTUNE_HOME": str(tmp_path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        deadline = time.monotonic() + 90
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "slmtune serve did not come up"
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["tiny", "alpha"]
        reply = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == greedy(served, "alpha").choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(30)
