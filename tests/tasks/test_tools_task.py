"""The tools task: references, parsing in either tool style, and every metric on a hand-made table."""

import json

import pytest

from slmtune.tasks import TASKS, detect_task, tools as task
from tests.test_tools import TOOLS, conversation


def row(calls: list[tuple[str, dict]] | None, answer: str = "Hello!") -> dict:
    last = ({"role": "assistant", "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(calls)]} if calls else {"role": "assistant", "content": answer})
    return {"tools": TOOLS, "messages": [{"role": "user", "content": "Do it."}, last]}


def hermes(*calls) -> str:
    return "\n".join(f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a)}}}\n</tool_call>' for n, a in calls)


def test_registry_detection_and_reference():
    assert TASKS["tools"] is task and detect_task(conversation()) == "tools"
    assert detect_task({"messages": []}) == "chat"
    assert task.reference(row([("set_alarm", {"hour": 7, "minute": 0})])) == [
        {"name": "set_alarm", "arguments": {"hour": 7, "minute": 0}}]
    assert task.reference(row(None)) == []
    assert task.to_example(conversation())["tools"] == TOOLS


def test_parse_reads_both_styles_and_keeps_malformed_calls_as_content():
    r = row(None)
    assert task.parse(hermes(("get_weather", {"city": "Oslo"})), r)["calls"] == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert task.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}', r)["calls"][0]["name"] == "get_weather"
    broken = task.parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": ', r)
    assert broken == {"calls": [], "attempted": True, "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": '}
    assert task.parse("Hi there", r) == {"calls": [], "attempted": False, "content": "Hi there"}


ALARM, OSLO = ("set_alarm", {"hour": 7, "minute": 30}), ("get_weather", {"city": "Oslo"})


def test_score_counts_each_metric():
    rows = [row([ALARM]), row([ALARM]), row([ALARM, OSLO]), row([OSLO]), row(None), row(None)]
    outputs = [
        hermes(ALARM),                                              # exact
        hermes(("set_alarm", {"hour": 7, "minute": 31})),           # right name, wrong argument
        hermes(OSLO, ALARM),                                        # both calls, other order: exact
        "It is sunny in Oslo.",                                     # missed call
        hermes(OSLO),                                               # wrong call
        "Hello!",                                                   # right: no call
    ]
    metrics = task.score([task.parse(o, r) for o, r in zip(outputs, rows)], rows)
    assert metrics == {"exact": pytest.approx(3 / 6), "call_exact": pytest.approx(2 / 4),
                       "name_accuracy": pytest.approx(3 / 4), "no_call_accuracy": pytest.approx(1 / 2),
                       "json_validity": 1.0, "missed_call_rate": pytest.approx(1 / 4),
                       "wrong_call_rate": pytest.approx(1 / 2), "n": 6, "n_with_calls": 4}


def test_arguments_compare_as_json_values_not_text():
    rows = [row([("set_alarm", {"hour": 7, "minute": 30})])]
    output = '<tool_call>\n{"name": "set_alarm", "arguments": {"minute": 30.0, "hour": 7}}\n</tool_call>'
    assert task.score([task.parse(output, rows[0])], rows)["call_exact"] == 1.0
