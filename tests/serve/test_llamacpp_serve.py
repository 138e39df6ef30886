"""`slmtune serve --backend llamacpp`: the same app over a GGUF export (tiny Llama LoRA run, f32),
checked with the official openai client against llama.cpp's own greedy generation."""

from __future__ import annotations

import numpy as np
import pytest

from slmtune.export.gguf import GGUF_FILE, export_gguf
from tests.serve.conftest import ServerThread, http_json

llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp runs need pip install -e ".[gguf]"')

MAX_TOKENS = 12
QUESTION = "What is fact number 3?"


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory, lora_run):
    return export_gguf(lora_run, tmp_path_factory.mktemp("gguf") / "export", "f32", llamacpp=False).path


@pytest.fixture(scope="module")
def llamacpp_served(gguf_export):
    from openai import OpenAI

    from slmtune.serve.app import create_app
    from slmtune.serve.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine.load(str(gguf_export), batch_wait_ms=20)
    server = ServerThread(create_app(engine)).start()
    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    yield server, engine, client
    server.stop()
    engine.stop()


def llamacpp_greedy(path, prompt_ids, eos_ids) -> list[int]:
    """The test's oracle: llama-cpp-python's own Llama, argmax token by token, nothing of ours."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
    llm.eval(prompt_ids)
    out: list[int] = []
    while len(out) < MAX_TOKENS:
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if out[-1] in eos_ids:
            break
        llm.eval([out[-1]])
    llm.close()
    return out


def test_the_backend_lists_the_model_and_takes_only_gguf_loras(llamacpp_served, gguf_export, lora_run):
    server, engine, client = llamacpp_served
    assert [m.id for m in client.models.list().data] == [gguf_export.name] == [engine.base_name]
    status, body = http_json(server.url + "/admin/adapters", body={"name": "x", "path": str(lora_run)})
    assert status == 400 and "gguf-lora" in body["error"]["message"]
    status, body = http_json(server.url + "/admin/adapters", body={"name": "x", "path": str(gguf_export / GGUF_FILE)})
    assert status == 400 and "not a LoRA adapter" in body["error"]["message"]
    assert engine.context_length == 512  # the tiny model's own context, from the GGUF


def test_adapters_by_name_answer_as_the_merged_export_does(lora_run, gguf_export, tmp_path, tiny_llama_dir):
    """GGUF LoRAs by name on one base GGUF: a request naming the adapter gets the merged export's
    greedy answer, one naming the base the base's, interleaved (the adapter is set per batch), and
    past max_loaded_adapters the least recently used is freed and loaded again when asked."""
    from slmtune.export.gguf import export_gguf_lora, write_gguf
    from slmtune.models import load_model, load_tokenizer
    from slmtune.serve.app import create_app
    from slmtune.serve.llamacpp_engine import LlamaCppEngine

    base = write_gguf(load_model(str(tiny_llama_dir)), load_tokenizer(str(tiny_llama_dir)), tmp_path / "base.gguf", "f32")
    lora = export_gguf_lora(lora_run, tmp_path / "lora", check_parity=False).path
    engine = LlamaCppEngine.load(str(base), {"tuned": str(lora)}, max_loaded_adapters=1, batch_wait_ms=20)
    server = ServerThread(create_app(engine)).start()
    try:
        messages = [{"role": "user", "content": QUESTION}]
        prompt_ids = engine.encode_chat(messages)
        expected = {"tuned": llamacpp_greedy(gguf_export / GGUF_FILE, prompt_ids, engine.eos_ids),
                    engine.base_name: llamacpp_greedy(base, prompt_ids, engine.eos_ids)}
        assert expected["tuned"] != expected[engine.base_name]  # the adapter changes the answer
        status, body = http_json(server.url + "/admin/adapters", body={"name": "second", "path": str(lora)})
        assert status == 201, body
        for model in ["tuned", engine.base_name, "second", "tuned", engine.base_name]:
            status, body = http_json(server.url + "/v1/chat/completions", body={
                "model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
            want = "tuned" if model == "second" else model
            assert status == 200 and body["usage"]["completion_tokens"] == len(expected[want]), (model, body)
            assert body["choices"][0]["message"]["content"] == engine.decode(
                [t for t in expected[want] if t not in engine.eos_ids]), model
        stats = engine.stats()
        assert stats["adapter_loads"] == 3 and stats["adapter_evictions"] == 2  # tuned, second, tuned again
    finally:
        server.stop()
        engine.stop()


def test_chat_stream_and_non_stream_equal_llamacpps_greedy_output(llamacpp_served, gguf_export):
    server, engine, client = llamacpp_served
    messages = [{"role": "user", "content": QUESTION}]
    prompt_ids = engine.encode_chat(messages)
    tokens = llamacpp_greedy(gguf_export / GGUF_FILE, prompt_ids, engine.eos_ids)
    stopped = tokens[-1] in engine.eos_ids
    text = engine.decode([t for t in tokens if t not in engine.eos_ids])
    assert text

    reply = client.chat.completions.create(model=engine.base_name, messages=messages, temperature=0,
                                           max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("stop" if stopped else "length")
    assert reply.usage.completion_tokens == len(tokens)

    chunks = list(client.chat.completions.create(model=engine.base_name, messages=messages, temperature=0,
                                                 max_tokens=MAX_TOKENS, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text


def test_seeded_sampling_is_reproducible_and_n_choices_differ(llamacpp_served):
    server, engine, client = llamacpp_served
    kwargs = dict(model=engine.base_name, messages=[{"role": "user", "content": QUESTION}], temperature=1.5,
                  max_tokens=MAX_TOKENS, seed=7, n=3)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # each choice has its own seed stream


def test_cli_serve_backend_llamacpp(gguf_export, lora_run, monkeypatch, capsys):
    import uvicorn

    from slmtune.cli import main
    from slmtune.serve.llamacpp_engine import LlamaCppEngine

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    assert main(["serve", "--backend", "llamacpp", "--model", str(gguf_export / GGUF_FILE)]) == 0
    engine = seen["app"].state.engine
    assert isinstance(engine, LlamaCppEngine) and engine.model_names() == [gguf_export.name]
    assert main(["serve", "--backend", "llamacpp", "--model", str(gguf_export), "--adapter", "a=b"]) == 2
    assert "no GGUF LoRA there" in capsys.readouterr().err
    assert main(["serve", "--backend", "llamacpp", "--model", str(lora_run)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
