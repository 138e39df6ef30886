"""`slmtune serve --backend onnx`: the same app over an ONNX export (tiny Llama LoRA run, fp32),
checked with the official openai client against the ONNX model's own greedy generation."""

import pytest

from tests.serve.conftest import ServerThread, http_json

MAX_TOKENS = 12
QUESTION = "What is fact number 3?"


@pytest.fixture(scope="module")
def onnx_served(onnx_export):
    from openai import OpenAI

    from slmtune.serve.app import create_app
    from slmtune.serve.onnx_engine import OnnxEngine

    engine = OnnxEngine.load(str(onnx_export.export_dir), batch_wait_ms=20)
    server = ServerThread(create_app(engine)).start()
    client = OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    yield server, engine, client
    server.stop()
    engine.stop()




def onnx_greedy(model, prompt_ids, max_new_tokens, eos_ids):
    """The test's oracle: onnxruntime-genai's Generator driven token by token, nothing of ours."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    out = []
    while not generator.is_done() and len(out) < max_new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
        if out[-1] in eos_ids:
            break
    return out


def _greedy_reference(export_dir, engine, prompt_ids):
    """What the ONNX model itself generates greedily, decoded as the server decodes."""
    import onnxruntime_genai as og

    tokens = onnx_greedy(og.Model(str(export_dir)), prompt_ids, MAX_TOKENS, engine.eos_ids)
    text_tokens = [t for t in tokens if t not in engine.eos_ids]
    return engine.decode(text_tokens), len(tokens), tokens[-1] in engine.eos_ids


def test_onnx_backend_lists_only_the_model(onnx_served, onnx_export):
    server, engine, client = onnx_served
    assert [m.id for m in client.models.list().data] == [onnx_export.export_dir.name] == [engine.base_name]
    status, body = http_json(server.url + "/admin/adapters", body={"name": "x", "path": str(onnx_export.run_dir)})
    assert status == 400 and "ONNX backend" in body["error"]["message"]
    status, body = http_json(server.url + "/v1/chat/completions", body={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]})
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_onnx_chat_stream_and_non_stream_equal_the_models_greedy_output(onnx_served, onnx_export):
    server, engine, client = onnx_served
    messages = [{"role": "user", "content": QUESTION}]
    prompt_ids = engine.encode_chat(messages)
    text, n_tokens, stopped = _greedy_reference(onnx_export.export_dir, engine, prompt_ids)
    assert text  # the tiny model says something

    reply = client.chat.completions.create(model=engine.base_name, messages=messages, temperature=0,
                                           max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("stop" if stopped else "length")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == n_tokens
    assert reply.usage.total_tokens == len(prompt_ids) + n_tokens

    chunks = list(client.chat.completions.create(model=engine.base_name, messages=messages, temperature=0,
                                                 max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed token by token, not in one piece
    assert "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        reply.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == n_tokens


def test_onnx_completions_and_sampling(onnx_served, onnx_export):
    server, engine, client = onnx_served
    prompt = "The Lumo 3 lamp"
    text, n_tokens, _ = _greedy_reference(onnx_export.export_dir, engine, engine.encode_text(prompt))
    done = client.completions.create(model=engine.base_name, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    assert done.choices[0].text == text and done.usage.completion_tokens == n_tokens

    # Sampling with a seed is reproducible; n choices of one request are generated together.
    kwargs = dict(model=engine.base_name, messages=[{"role": "user", "content": QUESTION}], temperature=1.5,
                  max_tokens=MAX_TOKENS, seed=7, n=2)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert engine.stats()["requests"] >= 5


def test_cli_serve_backend_onnx(onnx_export, monkeypatch, capsys):
    import uvicorn

    from slmtune.cli import main
    from slmtune.serve.onnx_engine import OnnxEngine

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    export_dir = str(onnx_export.export_dir)
    assert main(["serve", "--backend", "onnx", "--model", export_dir, "--port", "8123"]) == 0
    engine = seen["app"].state.engine
    assert isinstance(engine, OnnxEngine) and engine.model_names() == [onnx_export.export_dir.name]
    assert seen["port"] == 8123 and not engine.running
    assert main(["serve", "--backend", "onnx", "--model", export_dir, "--adapter", "a=b"]) == 2
    assert "takes no --adapter" in capsys.readouterr().err
    assert main(["serve", "--backend", "onnx", "--model", str(onnx_export.run_dir)]) == 2
    assert "not an ONNX export" in capsys.readouterr().err


def test_rows_joining_a_running_onnx_batch_answer_as_alone(onnx_served, onnx_export):
    """OnnxDecoder takes rows between steps (each row has its own generator): a joiner gets the
    ONNX model's own greedy answer and the running row is not disturbed."""
    from slmtune.generation import Completion, Decoding, SamplingParams
    from slmtune.export.onnx import OnnxDecoder

    _, engine, _ = onnx_served
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in (QUESTION, "What is fact number 7?")]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    expected = [_greedy_reference(onnx_export.export_dir, engine, p)[0] for p in prompts]
    running, joiner = (Completion(p, greedy, MAX_TOKENS) for p in prompts)
    calls = []

    def join():
        calls.append(1)
        return [Decoding(joiner, engine.decode, engine.eos_ids)] if len(calls) == 2 else []

    OnnxDecoder(engine.registry.model, len(engine.tokenizer)).decode(
        [Decoding(running, engine.decode, engine.eos_ids)], join)
    assert len(calls) >= 2 and [running.text, joiner.text] == expected
