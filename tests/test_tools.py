"""Function calling: OpenAI's tool data checked with codes and lines, rendered exactly as a tool-capable
template renders it (and through the documented fallback for templates without tools), the loss on the
assistant's call tokens only, generated calls parsed (malformed ones stay content), streaming that
reassembles to the non-streamed message, and forced calls whose arguments fit the schema."""

from __future__ import annotations

import copy
import json
import random

import jsonschema
import pytest
import torch

from slmtune.data.formats import check_example
from slmtune.data.tokenize import IGNORE, TemplateError, check_end_of_turn, encode, encode_chat
from slmtune.data.tools import (CALL_OPEN, CallStream, call_grammar, check_messages, from_legacy, parse_calls,
                                template_messages, tool_style)
from slmtune.data.validate import validate_file
from slmtune.generation import GrammarConstraint
from tests.conftest import build_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "description": "Set an alarm",
    "parameters": {"type": "object", "properties": {"hour": {"type": "integer"}, "minute": {"type": "integer"}},
                   "required": ["hour", "minute"]}}}
TOOLS = [WEATHER, ALARM]


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def conversation() -> dict:
    """Parallel calls, two results in a row, a final answer: the shapes templates handle differently."""
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Oslo, and wake me at 7:30."},
        {"role": "assistant", "tool_calls": [call("c1", "get_weather", {"city": "Oslo"}),
                                             call("c2", "set_alarm", {"hour": 7, "minute": 30})]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 4}'},
        {"role": "tool", "tool_call_id": "c2", "content": '{"ok": true}'},
        {"role": "assistant", "content": "It is 4 °C in Oslo; your alarm is set for 7:30."},
    ]}


# A tool-capable template in the style of Qwen2.5's (written for this test): tools listed in the
# system turn, calls in <tool_call> tags, consecutive tool results grouped in one user turn.
HERMES_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system' + nl }}{% if messages[0].role == 'system' %}"
    "{{ messages[0].content + nl + nl }}{% endif %}"
    "{{ '# Tools' + nl + '<tools>' }}{% for tool in tools %}{{ nl + (tool | tojson) }}{% endfor %}"
    "{{ nl + '</tools>' + nl + 'Return each call as a JSON object in <tool_call></tool_call> tags.<|im_end|>' + nl }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|im_start|>system' + nl + messages[0].content + '<|im_end|>' + nl }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ nl + '<tool_response>' + nl + message.content + nl + '</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>' + nl }}{% endif %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}{{ '<|im_start|>assistant' }}"
    "{%- if message.content %}{{ nl + message.content }}{% endif %}"
    "{%- for c in message.tool_calls %}{{ nl + '<tool_call>' + nl + '{\"name\": \"' + c.function.name"
    " + '\", \"arguments\": ' + (c.function.arguments | tojson) + '}' + nl + '</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>' + nl }}"
    "{%- else %}{{ '<|im_start|>' + message.role + nl + message.content + '<|im_end|>' + nl }}{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant' + nl }}{% endif %}"
).replace("nl", "'\\n'")


@pytest.fixture(scope="module")
def hermes_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = HERMES_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return build_tokenizer()  # SmolLM2-like ChatML without tool support: the fallback format


# --- data checks -------------------------------------------------------------------------------
def broken(edit) -> dict:
    data = conversation()
    edit(data)
    return data


BAD_CASES = {
    "unknown_function": lambda d: d["messages"][2]["tool_calls"][0]["function"].update(name="get_time"),
    "invalid_arguments": lambda d: d["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Oslo"),
    "arguments_violate_schema": lambda d: d["messages"][2]["tool_calls"][1]["function"].update(
        arguments=json.dumps({"hour": "seven", "minute": 30})),
    "unknown_tool_call_id": lambda d: d["messages"][3].update(tool_call_id="c9"),
    "invalid_tools": lambda d: d.update(tools=[{"type": "function", "function": {"name": "x y"}}]),
    "invalid_tool_call": lambda d: d["messages"][2].update(tool_calls={"id": "c1"}),
}


@pytest.mark.parametrize("code", sorted(BAD_CASES))
def test_each_bad_tool_case_has_its_code_and_line(tmp_path, code):
    good = [conversation() for _ in range(11)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good[:4] + [broken(BAD_CASES[code])] + good[4:]) + "\n")
    report = validate_file(path)
    assert [(i.code, i.line) for i in report.errors][:1] == [(code, 5)], [str(i) for i in report.errors]
    assert report.n_examples == 11


def test_a_missing_required_argument_is_a_schema_violation():
    data = broken(lambda d: d["messages"][2]["tool_calls"][1]["function"].update(arguments='{"hour": 7}'))
    [(code, message)] = check_messages(data)
    assert code == "arguments_violate_schema" and "minute" in message


def test_a_good_tool_conversation_passes_and_tool_role_is_known():
    assert check_example("chat", conversation()) == []


def test_legacy_functions_are_converted():
    legacy = {"functions": [WEATHER["function"]], "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        {"role": "function", "name": "get_weather", "content": '{"temp_c": 20}'},
        {"role": "assistant", "content": "20 °C."}]}
    data = from_legacy(legacy)
    assert data["tools"] == [WEATHER]
    assert data["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert data["messages"][2] == {"role": "tool", "tool_call_id": data["messages"][1]["tool_calls"][0]["id"],
                                   "content": '{"temp_c": 20}'}
    assert check_example("chat", legacy) == []


# --- rendering and the loss ------------------------------------------------------------------
def test_native_rendering_equals_the_templates_own_output(hermes_tokenizer):
    assert tool_style(hermes_tokenizer) == "hermes"
    data = conversation()
    example = encode("chat", data, hermes_tokenizer, max_length=None)
    messages, tools = template_messages(data["messages"], data["tools"], "hermes")
    own = hermes_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert hermes_tokenizer.decode(example.input_ids) == own
    assert '"arguments": {"hour": 7, "minute": 30}' in own and "<tool_response>\n{\"ok\": true}" in own


def trained_text(example, tokenizer) -> list[str]:
    """The trained spans of an example, decoded (targets are shifted by one)."""
    spans, current = [], []
    for position, target in enumerate(example.targets):
        if target != IGNORE:
            current.append(example.input_ids[position + 1])
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("which", ["hermes", "fallback"])
def test_the_loss_covers_exactly_the_assistants_calls_and_answer(which, hermes_tokenizer, chatml_tokenizer):
    tokenizer = hermes_tokenizer if which == "hermes" else chatml_tokenizer
    spans = trained_text(encode("chat", conversation(), tokenizer, max_length=None), tokenizer)
    assert spans == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "minute": 30}}\n</tool_call><|im_end|>\n',
        "It is 4 °C in Oslo; your alarm is set for 7:30.<|im_end|>\n"]


def test_fallback_puts_specs_in_the_system_turn_and_results_in_user_turns(chatml_tokenizer):
    assert tool_style(chatml_tokenizer) == "fallback"
    text = chatml_tokenizer.decode(encode("chat", conversation(), chatml_tokenizer, max_length=None).input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\nYou can call functions.")
    assert json.dumps(WEATHER["function"]) in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp_c\": 4}\n</tool_response><|im_end|>" in text


def test_the_end_of_turn_check_covers_tool_call_turns(chatml_tokenizer):
    end = {chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")}
    check_end_of_turn(conversation()["messages"], chatml_tokenizer, end, tools=TOOLS)
    with pytest.raises(TemplateError, match="end-of-turn"):
        check_end_of_turn(conversation()["messages"], chatml_tokenizer, {0}, tools=TOOLS)


# --- parsing and streaming -----------------------------------------------------------------------
NAMES = {"get_weather", "set_alarm"}
PARSE_CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', None, ["get_weather"]),
    ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "minute": 0}}\n</tool_call>',
     "Checking.", ["get_weather", "set_alarm"]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}', None, ["get_weather"]),  # unclosed at EOS
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', "same", []),  # cut: JSON incomplete
    ('<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>', "same", []),  # not an offered function
    ('<tool_call>\n{"name": "get_weather", "arguments": "x"}\n</tool_call>', "same", []),  # arguments not an object
    ('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call> and more', "same", []),  # text after
    ('<tool_call>\n{"name": "get_weather", "arguments": {"n": 1e999}}\n</tool_call>', "same", []),  # not JSON
    ("Just an answer.", "same", []),
]


@pytest.mark.parametrize("text,content,names", PARSE_CASES)
def test_parse_calls(text, content, names):
    got_content, calls = parse_calls(text, "hermes", NAMES)
    assert got_content == (text if content == "same" else content)
    assert [c["function"]["name"] for c in calls] == names
    for c in calls:
        assert c["id"].startswith("call_") and c["type"] == "function"
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


def test_parse_llama3_style():
    content, [found] = parse_calls(' {"name": "set_alarm", "parameters": {"hour": 6, "minute": 5}}', "llama3", NAMES)
    assert content is None and json.loads(found["function"]["arguments"]) == {"hour": 6, "minute": 5}
    assert parse_calls('{"name": "set_alarm", "parameters": ', "llama3", NAMES)[1] == []


@pytest.mark.parametrize("text,content,names", PARSE_CASES + [(" {\"name\": 1}", "same", [])])
@pytest.mark.parametrize("seed", range(3))
def test_streamed_pieces_reassemble_to_the_parsed_message(text, content, names, seed):
    style = "hermes"
    rng = random.Random(seed)
    stream = CallStream(style, NAMES)
    streamed, at = "", 0
    while at < len(text):
        step = rng.randint(1, 7)
        streamed += stream.feed(text[at:at + step])
        at += step
    rest, calls = stream.finish()
    expected_content, expected_calls = parse_calls(text, style, NAMES)
    assert streamed + rest == (expected_content or "")
    assert [c["function"] for c in calls] == [c["function"] for c in expected_calls]
    if expected_calls:  # nothing of a call was streamed as content
        assert CALL_OPEN not in streamed


# --- forcing a call ------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["hermes", "llama3"])
@pytest.mark.parametrize("name", [None, "set_alarm"])
def test_a_forced_call_parses_and_fits_the_schema_whatever_the_logits(style, name, chatml_tokenizer):
    tokenizer = chatml_tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for seed in range(3):
        constraint = GrammarConstraint(call_grammar(TOOLS, style, name), tokenizer, {eos})
        generator = torch.Generator().manual_seed(seed)
        tokens = []
        for _ in range(5000):  # random logits: only the constraint keeps this a call
            logits = torch.randn(len(tokenizer) + 3, generator=generator)  # a padded vocabulary too
            constraint.mask(logits)
            token = int(logits.argmax())
            if token == eos:
                break
            constraint.accept(token)
            tokens.append(token)
        else:
            pytest.fail("the constrained row never ended")
        content, calls = parse_calls(tokenizer.decode(tokens), style, NAMES)
        assert content is None and len(calls) == 1, tokenizer.decode(tokens)
        function = calls[0]["function"]
        assert name is None or function["name"] == name
        schema = next(t for t in TOOLS if t["function"]["name"] == function["name"])["function"]["parameters"]
        jsonschema.validate(json.loads(function["arguments"]), schema)


def test_check_messages_leaves_the_input_alone():
    data = conversation()
    before = copy.deepcopy(data)
    check_messages(data)
    encode_chat(data["messages"], build_tokenizer(), tools=data["tools"])
    assert data == before


def test_the_cli_names_code_file_and_line(tmp_path, capsys):
    from slmtune.cli import main

    path = tmp_path / "train.jsonl"
    rows = [conversation() for _ in range(10)] + [broken(BAD_CASES["unknown_function"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "validate", str(path)]) == 1
    assert f"{path}:11: error unknown_function: messages[2].tool_calls[0] calls 'get_time'" in capsys.readouterr().out


# --- preference pairs with tools (OpenAI's `input.tools`) ---------------------------------------
def tool_pair(preferred_args: dict, other_args: dict) -> dict:
    return {"input": {"messages": [{"role": "user", "content": "Wake me at 7:30."}], "tools": TOOLS},
            "preferred_output": [{"role": "assistant", "tool_calls": [call("c1", "set_alarm", preferred_args)]}],
            "non_preferred_output": [{"role": "assistant", "tool_calls": [call("c1", "set_alarm", other_args)]}]}


def test_a_preference_pair_of_tool_calls_is_checked_and_rendered_with_the_tools(chatml_tokenizer):
    from slmtune.data.tokenize import encode_pair

    good = tool_pair({"hour": 7, "minute": 30}, {"hour": 19, "minute": 30})
    assert check_example("preference", good) == []
    pair = encode_pair(good, chatml_tokenizer)
    chosen, rejected = (trained_text(e, chatml_tokenizer) for e in (pair.chosen, pair.rejected))
    assert chosen == ['<tool_call>\n{"name": "set_alarm", "arguments": {"hour": 7, "minute": 30}}\n</tool_call><|im_end|>\n']
    assert '"hour": 19' in rejected[0]
    assert "You can call functions." in chatml_tokenizer.decode(pair.chosen.input_ids)  # the tools are offered
    same = tool_pair({"hour": 7, "minute": 30}, {"hour": 7, "minute": 30})
    assert [code for code, _ in check_example("preference", same)] == ["identical_outputs"]
    bad = tool_pair({"hour": "seven", "minute": 30}, {"hour": 19, "minute": 30})
    [(code, message)] = check_example("preference", bad)
    assert code == "arguments_violate_schema" and message.startswith("`preferred_output`.tool_calls[0]")
