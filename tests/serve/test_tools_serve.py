"""`tools` / `tool_choice` / `tool_calls` in /v1/chat/completions, through the official openai client on a
tiny random model: forced calls come back as parsed tool_calls that fit the schema, streamed deltas
reassemble to the non-streamed message, unforced answers are content, bad tool input is a 400."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import build_model
from tests.serve.conftest import ServerThread

# Bounded values (enums, integer ranges): a random model's forced call always ends within max_tokens.
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris", "Lima"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": {
        "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                         "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
        "required": ["hour", "minute"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Wake me at 7:30."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_tokenizer):
    from openai import OpenAI

    from slmtune.serve.app import create_app
    from slmtune.serve.engine import Engine

    # The tiny tokenizer spends a token on almost every character of the tool specs: a longer context.
    path = tmp_path_factory.mktemp("tiny-tools")
    build_model("llama", len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id,
                max_positions=2048).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    engine = Engine.load(str(path), batch_wait_ms=5)
    server = ServerThread(create_app(engine)).start()
    yield OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120), engine.base_name
    server.stop()
    engine.stop()


def assert_valid_call(call, name=None):
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_alarm"}}])
def test_a_forced_choice_answers_with_a_valid_call(client, choice):
    api, model = client
    reply = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=choice,
                                        temperature=0, max_tokens=120, n=2)
    for c in reply.choices:
        assert c.finish_reason == "tool_calls", c.message
        [call] = c.message.tool_calls
        assert_valid_call(call, None if choice == "required" else "set_alarm")
        assert c.message.content is None


def test_streamed_deltas_reassemble_to_the_message(client):
    api, model = client
    kwargs = dict(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = api.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = "", {}, None
    for chunk in api.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            for delta in c.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert content == (whole.message.content or "")
    assert list(calls.values()) == [{"name": t.function.name, "arguments": t.function.arguments}
                                    for t in whole.message.tool_calls]


def test_auto_on_an_untrained_model_answers_content_not_an_error(client):
    api, model = client
    whole = api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=20)
    assert whole.choices[0].finish_reason in ("stop", "length") and not whole.choices[0].message.tool_calls
    assert isinstance(whole.choices[0].message.content, str)
    chunks = list(api.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=20,
                                              stream=True))
    # the stream says the same: the same text, the same finish, no call
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


def test_a_conversation_with_calls_and_results_is_answered(client):
    api, model = client
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "set_alarm",
                                                               "arguments": '{"hour": 7, "minute": 30}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'}]
    reply = api.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=8)
    assert reply.choices[0].message.tool_calls is None


BAD_REQUESTS = {
    "invalid_tools": dict(tools=[{"type": "function", "function": {"name": "two words"}}]),
    "tool_choice names": dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "launch"}}),
    "tool_choice needs": dict(tool_choice="required"),
    "unknown_tool_call_id": dict(tools=TOOLS, messages=ASK + [{"role": "tool", "tool_call_id": "call_9",
                                                                "content": "{}"}]),
    "invalid_arguments": dict(tools=TOOLS, messages=ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "set_alarm", "arguments": "{hour: 7"}}]}]),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_tool_input_is_a_400(client, case):
    api, model = client
    kwargs = {"messages": ASK} | BAD_REQUESTS[case]
    with pytest.raises(openai.BadRequestError) as raised:
        api.chat.completions.create(model=model, max_tokens=4, **kwargs)
    error = raised.value.body
    assert case in (error.get("code") or "") or case in error["message"], error
