"""Function calling: OpenAI's chat format with `tools`; the last assistant turn is the reference,
either tool calls or a plain answer (a request no tool serves).

    {"tools": [...], "messages": [{"role": "user", "content": "Wake me at 6:45"},
                                  {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                       "function": {"name": "set_alarm", "arguments": "{\\"hour\\": 6, \\"minute\\": 45}"}}]}]}

Trained as is (slmtune/data/tools.py renders tools and calls). Evaluation generates the last
assistant turn with the tools offered, parses calls in either tool style, and scores:
  call_exact          calls expected, and exactly these functions with exactly these arguments (values
                      compared after JSON parsing, calls in any order)
  name_accuracy       calls expected, and exactly these function names
  no_call_accuracy    no call expected, and none made
  exact               call_exact or no_call_accuracy, over every row
  json_validity       the model wrote a call (a `<tool_call>` block or a JSON object): it parsed
  missed_call_rate    calls expected, none made
  wrong_call_rate     no call expected, a call made
"""

from __future__ import annotations

import json

from slmtune.data.formats import check_example
from slmtune.data.tools import CALL_OPEN, from_legacy, parse_calls
from slmtune.tasks.common import ratio

NAME = "tools"
FORMAT = "chat"
FIELDS = ("messages", "tools")
SYSTEM_PROMPT: str | None = None
INSTRUCTION = "{content}"
MAX_NEW_TOKENS = 128
USES_LOSS = False
METRIC = "exact"
COPIED_FROM = None


def check(row: dict) -> list:
    problems = list(check_example("chat", row))
    if "tools" not in from_legacy(row):
        problems.append(("missing_field", "`tools` is missing: a tools row offers the functions it may call"))
    return problems


def context(rows: list[dict]) -> dict:
    return {}


def to_example(row: dict) -> dict:
    row = from_legacy(row)
    return {"messages": [dict(m) for m in row["messages"]], "tools": row["tools"]}


def _call(name: str, arguments) -> dict:
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return {"name": name, "arguments": arguments}


def reference(row: dict) -> list[dict]:
    """The expected calls ({"name", "arguments" parsed}) of the last assistant turn; [] for an answer."""
    last = [m for m in from_legacy(row)["messages"] if m.get("role") == "assistant"][-1]
    return [_call(c["function"]["name"], c["function"]["arguments"]) for c in last.get("tool_calls") or []]


def parse(output_text: str, row: dict) -> dict:
    """{"calls": [...], "attempted": bool, "content": str | None}, whichever tool style the model uses."""
    names = {t["function"]["name"] for t in from_legacy(row)["tools"]}
    attempted = CALL_OPEN in output_text or output_text.strip().startswith("{")
    for style in ("hermes", "llama3"):
        content, calls = parse_calls(output_text, style, names)
        if calls:
            return {"calls": [_call(c["function"]["name"], c["function"]["arguments"]) for c in calls],
                    "attempted": True, "content": content}
    return {"calls": [], "attempted": attempted, "content": output_text}


def same_calls(got: list[dict], expected: list[dict]) -> bool:
    """The same calls in any order; arguments equal as JSON values (20 == 20.0)."""
    left = list(got)
    for call in expected:
        match = next((i for i, c in enumerate(left) if c == call), None)
        if match is None:
            return False
        left.pop(match)
    return not left


def score(predictions: list, rows: list[dict], losses: list[dict] | None = None) -> dict:
    with_calls = exact_calls = names_right = missed = 0
    without_calls = no_call_right = wrong_calls = attempted = parsed = 0
    for prediction, row in zip(predictions, rows):
        expected = reference(row)
        got = (prediction or {}).get("calls", [])
        attempted += bool(prediction and prediction["attempted"])
        parsed += bool(got)
        if expected:
            with_calls += 1
            exact_calls += same_calls(got, expected)
            names_right += sorted(c["name"] for c in got) == sorted(c["name"] for c in expected)
            missed += not got
        else:
            without_calls += 1
            no_call_right += not got
            wrong_calls += bool(got)
    return {
        "exact": ratio(exact_calls + no_call_right, len(rows)),
        "call_exact": ratio(exact_calls, with_calls),
        "name_accuracy": ratio(names_right, with_calls),
        "no_call_accuracy": ratio(no_call_right, without_calls),
        "json_validity": ratio(parsed, attempted),
        "missed_call_rate": ratio(missed, with_calls),
        "wrong_call_rate": ratio(wrong_calls, without_calls),
        "n": len(rows), "n_with_calls": with_calls,
    }
