"""Tool (function) calling, the one home of the concept: OpenAI's data format checked, conversations
with tools rendered for the chat template (training and serving alike), and generated calls parsed.

Data (OpenAI's fine-tuning chat format with function calling), one JSON object per line:
    {"tools": [{"type": "function", "function": {"name", "description", "parameters": <JSON schema>}}],
     "parallel_tool_calls": true,
     "messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "{\\"temp_c\\": 4}"},
                  {"role": "assistant", "content": "It is 4 °C in Oslo."}]}
The legacy shape (`functions`, assistant `function_call`, role `function`) is converted by `from_legacy`.

Rendering (`template_messages`), chosen by `tool_style(tokenizer)`:
- "hermes" (native; Qwen2.5 and other templates that write `<tool_call>` tags) and "llama3" (native;
  Llama 3.1/3.2's `{"name", "parameters"}` JSON turn): messages and `tools` go to the model's own
  template (`apply_chat_template(..., tools=...)`), so a fine-tune sees what the model expects.
- "fallback" (templates without tool support, e.g. SmolLM2's): the tool specs follow the system turn
  (TOOLS_SYSTEM_PROMPT, one JSON spec per line), each call is written in the assistant's text as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, and a tool result is a user turn
  `<tool_response>\\n...\\n</tool_response>`. Training and serving use this same text, and the calls
  are parsed back with the hermes parser.
In both, the assistant's call tokens are trained like its content; tool specs and results never are.

Parsing (`parse_calls`): a generated text -> (content, calls); a call that is not valid JSON, names
no offered function or has no object of arguments leaves the whole text as content (never an error).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
STYLES = ("hermes", "llama3", "fallback")
TOOLS_SYSTEM_PROMPT = (
    "You can call functions. Their signatures, one JSON object per line:\n{specs}\n"
    "To call a function, answer with one line per call:\n"
    f'{CALL_OPEN}\n{{"name": <function name>, "arguments": <JSON object>}}\n{CALL_CLOSE}'
)  # {specs} is replaced (not str.format: the call syntax has braces)
MAX_TOOLS = 128  # OpenAI's limit on functions per request


# --- checks ------------------------------------------------------------------------------------
def from_legacy(data: dict) -> dict:
    """OpenAI's legacy `functions` / `function_call` / role `function` example in today's shape
    (`tools`, `tool_calls`, role `tool`); other examples are returned unchanged."""
    messages = data.get("messages")
    if "functions" not in data and not (isinstance(messages, list) and any(
            isinstance(m, dict) and ("function_call" in m or m.get("role") == "function") for m in messages)):
        return data
    out = {k: v for k, v in data.items() if k != "functions"}
    if isinstance(data.get("functions"), list):
        out["tools"] = [{"type": "function", "function": f} for f in data["functions"]]
    converted, last_id = [], {}  # function name -> id of its latest call, for the `function` results
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(m, dict):
            converted.append(m)
        elif "function_call" in m:
            call = m["function_call"]
            call_id = f"call_{i}"
            if isinstance(call, dict):
                last_id[call.get("name")] = call_id
            m = {k: v for k, v in m.items() if k != "function_call"}
            converted.append(m | {"tool_calls": [{"id": call_id, "type": "function", "function": call}]})
        elif m.get("role") == "function":
            converted.append({"role": "tool", "tool_call_id": last_id.get(m.get("name"), ""),
                              "content": m.get("content")})
        else:
            converted.append(m)
    out["messages"] = converted
    return out


def check_tools(tools: Any) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    """Problems of a line's `tools`, and the offered functions by name (with their `parameters`)."""
    if not isinstance(tools, list) or not tools:
        return [("invalid_tools", "`tools` must be a non-empty list of function specs")], {}
    if len(tools) > MAX_TOOLS:
        return [("invalid_tools", f"`tools` lists {len(tools)} functions; at most {MAX_TOOLS}")], {}
    problems, specs = [], {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            problems.append(("invalid_tools", f'tools[{i}] must be {{"type": "function", "function": {{...}}}}'))
            continue
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            problems.append(("invalid_tools", f"tools[{i}].function.name must be 1-64 letters, digits, _ or -"))
            continue
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        try:
            if not isinstance(parameters, dict):
                raise SchemaError("not an object")
            Draft202012Validator.check_schema(parameters)
        except SchemaError as err:
            problems.append(("invalid_tools", f"tools[{i}].function.parameters is not a JSON schema: "
                                              f"{err.message[:200]}"))
            continue
        if name in specs:
            problems.append(("invalid_tools", f"tools[{i}] repeats the function name {name!r}"))
        specs[name] = parameters
    return problems, specs


def argument_problems(arguments: Any, parameters: dict) -> tuple[str, str] | None:
    """Why a call's `arguments` (a JSON string) is unusable for a function with this schema, or None."""
    if not isinstance(arguments, str):
        return "invalid_arguments", "`arguments` must be a string holding a JSON object"
    try:
        value = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        return "invalid_arguments", "`arguments` is not valid JSON"
    if not isinstance(value, dict):
        return "invalid_arguments", "`arguments` must be a JSON object"
    error = next(iter(Draft202012Validator(parameters).iter_errors(value)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        return "arguments_violate_schema", f"arguments at {where}: {error.message[:200]}"
    return None


def check_messages(data: dict) -> list[tuple[str, str]]:
    """Tool problems of a chat example (already through from_legacy): its `tools`, every assistant
    `tool_calls` against them, and every `tool` message against the calls made before it."""
    problems: list[tuple[str, str]] = []
    specs: dict[str, dict] = {}
    if "tools" in data:
        problems, specs = check_tools(data["tools"])
    if "parallel_tool_calls" in data and not isinstance(data["parallel_tool_calls"], bool):
        problems.append(("invalid_tools", "`parallel_tool_calls` must be true or false"))
    open_calls: set[str] = set()
    for i, m in enumerate(data.get("messages") or []):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in open_calls:
                problems.append(("unknown_tool_call_id", f"messages[{i}].tool_call_id {call_id!r} answers no "
                                                         "earlier tool call"))
            continue
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if m.get("role") != "assistant":
            problems.append(("invalid_tool_call", f"messages[{i}] has tool_calls but is not an assistant message"))
            continue
        if not isinstance(calls, list) or not calls:
            problems.append(("invalid_tool_call", f"messages[{i}].tool_calls must be a non-empty list"))
            continue
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or call.get("type", "function") != "function" \
                    or not isinstance(call.get("id", ""), str):
                problems.append(("invalid_tool_call", f'{where} must be {{"id", "type": "function", '
                                                      '"function": {"name", "arguments"}}'))
                continue
            name = function.get("name")
            if name not in specs:
                offered = ", ".join(specs) or "none"
                problems.append(("unknown_function", f"{where} calls {name!r}, not in `tools` (offered: {offered})"))
            found = argument_problems(function.get("arguments"), specs.get(name, {}))
            if found:
                problems.append((found[0], f"{where}: {found[1]}"))
            if call.get("id"):
                open_calls.add(call["id"])
    return problems


def uses_tools(messages: list, tools: list | None = None) -> bool:
    """Whether a conversation is rendered in its tool style: tools offered, calls made or results given."""
    return bool(tools) or any(isinstance(m, dict) and ("tool_calls" in m or m.get("role") == "tool")
                              for m in messages)


def has_tools(data: dict) -> bool:
    """Whether a chat line is a tool conversation (a `tools` key, even an empty one, or tool turns)."""
    return "tools" in data or uses_tools(data.get("messages") or [])


# --- rendering ---------------------------------------------------------------------------------
def tool_style(tokenizer) -> str:
    """How this tokenizer's chat template writes tool calls: "hermes", "llama3" (native) or "fallback"."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str) or "tools" not in template:
        return "fallback"
    if CALL_OPEN in template:
        return "hermes"
    if "ipython" in template and '"parameters"' in template:
        return "llama3"
    return "fallback"  # a tool syntax we could not parse back: train and serve on ours instead


def call_text(calls: list[dict]) -> str:
    """Calls as the fallback style writes them: one `<tool_call>` block of {"name", "arguments"} each
    (native styles get the calls from the template)."""
    blocks = []
    for call in calls:
        function = call["function"]
        arguments = function["arguments"]
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        blocks.append(f"{CALL_OPEN}\n{json.dumps({'name': function['name'], 'arguments': arguments}, ensure_ascii=False)}"
                      f"\n{CALL_CLOSE}")
    return "\n".join(blocks)


def tools_system_prompt(tools: list[dict]) -> str:
    specs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return TOOLS_SYSTEM_PROMPT.replace("{specs}", specs)


def template_messages(messages: list[dict], tools: list[dict] | None, style: str) -> tuple[list[dict], list | None]:
    """(messages, tools) to hand to apply_chat_template. Keys other than role/content/tool_calls/
    tool_call_id/name are dropped except `weight`, which the caller strips (it marks trained turns)."""
    out: list[dict] = []
    if style == "fallback":
        if tools:
            spec = tools_system_prompt(tools)
            if messages and messages[0]["role"] == "system":
                first = dict(messages[0]) | {"content": f"{messages[0]['content']}\n\n{spec}"}
                messages = [first] + list(messages[1:])
            else:
                messages = [{"role": "system", "content": spec}] + list(messages)
        for m in messages:
            keep = {k: m[k] for k in ("weight",) if k in m}
            if m["role"] == "assistant" and m.get("tool_calls"):
                content = (m.get("content") or "").strip()
                text = call_text(m["tool_calls"])
                out.append({"role": "assistant", "content": f"{content}\n{text}" if content else text} | keep)
            elif m["role"] == "tool":
                out.append({"role": "user", "content": f"{RESPONSE_OPEN}\n{m.get('content') or ''}\n{RESPONSE_CLOSE}"})
            else:
                out.append({"role": m["role"], "content": m.get("content") or ""} | keep)
        return out, None
    for m in messages:
        message = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            # Templates expect the arguments as a mapping (they serialize them with `tojson`).
            message["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": {
                "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])
                if isinstance(c["function"]["arguments"], str) else c["function"]["arguments"]}}
                for c in m["tool_calls"]]
        for key in ("tool_call_id", "name", "weight"):
            if key in m:
                message[key] = m[key]
        out.append(message)
    return out, (tools or None)


# --- forcing a call ----------------------------------------------------------------------------
# json.dumps' separators, no other whitespace: what the model saw in training, and no room to wander.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def call_grammar(tools: list[dict], style: str, name: str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for one call, written the way `style` writes calls, to a
    function of `tools` (to `name` when given) with arguments valid for its `parameters` schema."""
    key = "parameters" if style == "llama3" else "arguments"
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = dict(function.get("parameters") or {"type": "object"})
        if "properties" in parameters:  # a forced call names no argument the function does not declare
            parameters.setdefault("additionalProperties", False)
        options.append({"type": "object", "additionalProperties": False, "required": ["name", key],
                        "properties": {"name": {"const": function["name"]}, key: parameters}})
    if not options:
        raise ValueError(f"no function named {name!r} among the tools")
    schema = (options[0] if len(options) == 1 else {"anyOf": options}) | {"x-guidance": JSON_STYLE}
    call = f"call: %json {json.dumps(schema)}"
    if style == "llama3":
        return f"start: call\n{call}"
    return f"start: {json.dumps(CALL_OPEN + chr(10))} call {json.dumps(chr(10) + CALL_CLOSE)}\n{call}"


# --- parsing -----------------------------------------------------------------------------------
def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _as_call(value: Any, names: set[str] | None) -> dict | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict) or (names is not None and value["name"] not in names):
        return None
    try:
        text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except ValueError:  # a number too large for a float (1e999) is read as infinity: not JSON
        return None
    return {"id": new_call_id(), "type": "function", "function": {"name": value["name"], "arguments": text}}


_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


def parse_calls(text: str, style: str, names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """(content, calls) of a generated answer. Hermes/fallback: `<tool_call>` blocks after optional
    content (the content is the text before the first block, trailing space removed); llama3: the whole
    answer is one {"name", "parameters"} object. Anything malformed: (the whole text, [])."""
    if style == "llama3":
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                call = _as_call(json.loads(stripped), names)
            except (json.JSONDecodeError, RecursionError):
                call = None
            if call is not None:
                return None, [call]
        return text, []
    start = text.find(CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for match in _CALL_BLOCK.finditer(text, start):
        try:
            call = _as_call(json.loads(match.group(1)), names)
        except (json.JSONDecodeError, RecursionError):
            call = None
        if call is None or text[match.end():].strip() and not text[match.end():].lstrip().startswith(CALL_OPEN):
            return text, []
        calls.append(call)
    content = text[:start].rstrip()
    return (content or None), calls


@dataclass
class CallStream:
    """Streams an answer's content while holding back what may be a tool call, so that the streamed
    content plus the calls parsed at the end equal the non-streamed message (`parse_calls`)."""

    style: str
    names: set[str] | None = None
    text: str = ""
    sent: int = 0
    held: bool = False  # a call may have started: nothing more is streamed until the end

    def feed(self, piece: str) -> str:
        """The content that can be sent now, given the next piece of generated text."""
        self.text += piece
        if self.held:
            return ""
        if self.style == "llama3":
            stripped = self.text.lstrip()
            if not stripped:
                return ""
            if stripped.startswith("{"):  # the whole answer may be one call
                self.held = True
                return ""
            return self._send(len(self.text))
        at = self.text.find(CALL_OPEN)
        if at >= 0:
            self.held = True
            return self._send(len(self.text[:at].rstrip()))
        # Hold back trailing space and a trailing partial "<tool_call>" (either may precede a call).
        end = len(self.text)
        for k in range(min(len(CALL_OPEN) - 1, end), 0, -1):
            if self.text.endswith(CALL_OPEN[:k]):
                end -= k
                break
        return self._send(len(self.text[:end].rstrip()))

    def finish(self) -> tuple[str, list[dict]]:
        """(the rest of the content, the calls) once generation ended."""
        content, calls = parse_calls(self.text, self.style, self.names)
        rest = (content or "")[self.sent:]
        self.sent += len(rest)
        return rest, calls

    def _send(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece
