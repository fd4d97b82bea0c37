"""OpenAI tool-calling fields of /v1/chat/completions (the request side and the reply side).

Request: `tools` (function definitions), `tool_choice` ("auto" | "none" | "required" |
{"type": "function", "function": {"name": ...}}), assistant messages with `tool_calls`, `tool` messages
with `tool_call_id`, and vLLM's `chat_template_kwargs: {"enable_thinking": false}`.
  auto      the template lists the tools; calls the model writes are parsed out of its text
  none      the tools are left out of the prompt and nothing is parsed (the model answers in text)
  required  / a named function: the prompt ends with the opening of a call (`<tool_call>\\n{"name": "`,
            or up to `"arguments": ` for a named one) so the model can only continue a call; that forced
            prefix is part of the text the parser reads.
Reply: `tool_calls` (arguments as a JSON string) with `finish_reason: "tool_calls"`; streaming sends each
call whole in one delta once its closing tag arrives (tool_calls.ToolCallStream). A malformed call stays
text (content), never an error.
"""

from __future__ import annotations

import json

from tinylm.serving.api_error import APIError
from tinylm.text.tool_calls import OPEN, ToolCallStream


def _error(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


def parse_tools(body: dict) -> list[dict] | None:
    """The request's `tools`, checked (None when absent or empty)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > 128:
        raise _error("'tools' must be an array of at most 128 function tools", "tools")
    out = []
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _error(f"tools[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                         f"tools[{j}]")
        if not isinstance(fn.get("parameters", {}), dict) or not isinstance(fn.get("description", ""), str):
            raise _error(f"tools[{j}].function: 'parameters' must be an object, 'description' a string",
                         f"tools[{j}].function")
        out.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters")
                                                     if k in fn}})
    return out or None


def parse_tool_choice(body: dict, tools: list[dict] | None) -> str | None:
    """"auto" | "none" | "required" | the forced function's name."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise _error("tool_choice 'required' needs 'tools'", "tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise _error("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                     "\"function\": {\"name\": ...}}", "tool_choice")
    if not tools or name not in {t["function"]["name"] for t in tools}:
        raise _error(f"tool_choice names {name!r}, which is not in 'tools'", "tool_choice")
    return name


def parse_enable_thinking(body: dict) -> bool | None:
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return None
    if not isinstance(kw, dict):
        raise _error("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    value = kw.get("enable_thinking")
    if value is not None and not isinstance(value, bool):
        raise _error("chat_template_kwargs.enable_thinking must be a boolean", "chat_template_kwargs.enable_thinking")
    return value


def message_fields(m: dict, i: int) -> dict:
    """Tool fields of request message i: an assistant's `tool_calls` (arguments parsed when they are a
    JSON object, else kept as the string the client sent), a tool result's `tool_call_id` / `name`.
    Exactly what the OpenAPI schema (server_openapi.py) allows is accepted: the fuzzer checks both ways."""
    out = {}
    where = f"messages[{i}].tool_calls"
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _error(f"{where} must be an array", where)
        parsed = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"] \
                    or not isinstance(fn.get("arguments"), str) or c.get("type", "function") != "function" \
                    or not isinstance(c.get("id", ""), str):
                raise _error(f"{where}[{j}] needs function.name and function.arguments (a string of JSON)",
                             f"{where}[{j}]")
            parsed.append({"id": c.get("id"), "type": "function",
                           "function": {"name": fn["name"], "arguments": _arguments(fn["arguments"])}})
        if parsed and m.get("role") == "assistant":
            out["tool_calls"] = parsed
    call_id = m.get("tool_call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise _error(f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
    if m.get("role") == "tool" and call_id is not None:
        out["tool_call_id"] = call_id
    return out


def _arguments(text: str) -> dict | str:
    try:
        args = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text
    return args if isinstance(args, dict) else text


def forced_prefix(choice: str | None, tools: list[dict] | None) -> str | None:
    """Text the reply must start with (appended to the prompt), "" to parse freely, None: no tool parsing."""
    if not tools or choice == "none":
        return None
    if choice == "auto":
        return ""
    if choice == "required":
        return f'{OPEN}\n{{"name": "'
    return f'{OPEN}\n{{"name": {json.dumps(choice, ensure_ascii=False)}, "arguments": '


def prefix_ids(tokenizer, prefix: str) -> list[int]:
    """Ids of the forced prefix: its <tool_call> tag is a control token (ours), the rest plain text."""
    from tinylm.text.special_tokens import encode_text

    if not prefix:
        return []
    return [tokenizer.convert_tokens_to_ids(OPEN)] + encode_text(tokenizer, prefix[len(OPEN):])


class ReplyTools:
    """Per choice: feed generated content, get (content, tool-call deltas); knows the finish reason."""

    def __init__(self, prefix: str) -> None:
        self.stream, self.pending, self.calls = ToolCallStream(), prefix, 0

    def push(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        text, self.pending = self.pending + text, ""
        content, calls = self.stream.push(text)
        if final:
            rest, _ = self.stream.flush()
            content += rest
        out = [{"index": self.calls + k, **c} for k, c in enumerate(calls)]
        self.calls += len(calls)
        return content, out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason
