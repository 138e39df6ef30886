"""Tool-use data through the fine-tuning service with the official openai client: bad tool data is a
400 naming its code and line, a job trains on tool conversations, and its model answers `tools=`
requests with `tool_calls`; the acceptance test measures SmolLM2-135M on unseen phrasings."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import REPO
from tests.service.conftest import BASE, smollm2_job, wait_for
from tests.test_tools import BAD_CASES, conversation

PING = {"type": "function", "function": {"name": "ping", "parameters": {
    "type": "object", "properties": {"host": {"type": "string", "enum": ["alpha", "beta"]}}, "required": ["host"]}}}


def ping_row(i: int) -> dict:
    """A short conversation (the tiny test tokenizer spends a token on almost every character)."""
    host = "alpha" if i % 2 else "beta"
    return {"tools": [PING], "messages": [
        {"role": "user", "content": f"Ping {host}."},
        {"role": "assistant", "tool_calls": [{"id": f"c{i}", "type": "function",
                                              "function": {"name": "ping", "arguments": json.dumps({"host": host})}}]}]}


def broken_row(code: str) -> dict:
    """tests/test_tools.py's conversation, broken the way BAD_CASES[code] breaks it."""
    row = conversation()
    BAD_CASES[code](row)
    return row


@pytest.mark.parametrize("code", sorted(BAD_CASES))
def test_each_bad_tool_case_is_a_400_naming_code_and_line(sqlite_service, upload, code):
    client = sqlite_service.client("tools")
    with pytest.raises(openai.BadRequestError) as err:
        upload(client, [ping_row(i) for i in range(4)] + [broken_row(code)], name="bad.jsonl")
    assert err.value.body["code"] == "invalid_file_format"
    assert f"line 5: {code}" in err.value.body["message"], err.value.body["message"]


def test_a_job_trains_on_tool_calls_and_its_model_answers_with_them(sqlite_service, upload):
    client = sqlite_service.client("tools")
    f = upload(client, [ping_row(i) for i in range(12)], name="tools.jsonl")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="tools", seed=5, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "Ping alpha."}],
                                           tools=[PING], tool_choice="required", temperature=0, max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "ping" and json.loads(call.function.arguments)["host"] in ("alpha", "beta")


@pytest.mark.slow
@pytest.mark.acceptance
def test_smollm2_learns_three_functions_with_auto_hyperparameters(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct, "auto" hyperparameters, examples/tools (150 conversations over
    3 functions): on 60 unseen phrasings, with `tools=` and temperature 0, at least 80% of the
    requests that need a call get exactly the right call (~12 min on 2 cores; docs/results.md)."""
    examples = REPO / "examples" / "tools"
    with smollm2_job(tmp_path / "home", monkeypatch, "agents", examples / "train.jsonl", timeout=2400) as (client, job):
        assert job.status == "succeeded", job.error
        right = expected = 0
        for line in (examples / "test.jsonl").read_text().splitlines():
            row = json.loads(line)
            want = row["messages"][-1].get("tool_calls")
            if not want:
                continue
            expected += 1
            reply = client.chat.completions.create(model=job.fine_tuned_model, messages=row["messages"][:-1],
                                                   tools=row["tools"], temperature=0, max_tokens=96)
            got = reply.choices[0].message.tool_calls or []
            right += [(c.function.name, json.loads(c.function.arguments)) for c in got] == \
                [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want]
        print(f"exact tool calls on {expected} unseen requests: {right}/{expected}; "
              f"auto hyperparameters {job.hyperparameters}")
        assert right / expected >= 0.8
