"""GET /openapi.json for `tinylm serve`: what the request parser accepts and what the handlers return.

JSON Schema written by hand. The handlers read raw JSON and validate it themselves (server_requests.py:
OpenAI-shaped 400s that name the field, instead of FastAPI's 422s), so no pydantic model stands between
the two; the limits come from server_requests.py itself, and tests/test_server_fuzz.py fuzzes the server
from this document and fails on any disagreement.
"""

from __future__ import annotations

from tinylm.serving.server_requests import MAX_PROMPTS, MAX_STOP_CHARS, MAX_STOPS, NUMBERS, ROLES


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _closed(required: list[str], **properties: dict) -> dict:
    """An object with exactly these properties: a response that grows a field must update its schema."""
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


def _request_properties(model_name: str, max_tokens_cap: int) -> dict:
    """Fields shared by both generation endpoints (null = default, as parse_params reads them)."""
    flag, stop = _nullable({"type": "boolean"}), {"type": "string", "maxLength": MAX_STOP_CHARS}
    props = {"model": _nullable({"type": "string", "enum": [model_name]}),
             "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": max_tokens_cap}),
             "max_completion_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": max_tokens_cap}),
             "stop": _nullable({"anyOf": [stop, {"type": "array", "maxItems": MAX_STOPS, "items": stop}]}),
             "stream": flag, "ignore_eos": flag,
             "stream_options": _nullable({"type": "object", "properties": {"include_usage": flag}})}
    for name, (lo, hi, integer) in NUMBERS.items():
        props[name] = _nullable({"type": "integer" if integer else "number", "minimum": lo, "maximum": hi})
    return props


def _request_schemas(model_name: str, max_tokens_cap: int, vocab_size: int) -> dict:
    shared = _request_properties(model_name, max_tokens_cap)
    text = {"type": "string", "minLength": 1}
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
    parts = {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}
    message = {"type": "object", "required": ["role"],
               "properties": {"role": {"enum": sorted(ROLES)},
                              "content": _nullable({"anyOf": [{"type": "string"}, parts]}),
                              "tool_call_id": _nullable({"type": "string"}),
                              "tool_calls": _nullable({"type": "array", "items": {
                                  "type": "object", "required": ["function"], "properties": {
                                      "id": {"type": "string"}, "type": {"const": "function"},
                                      "function": {"type": "object", "required": ["name", "arguments"], "properties": {
                                          "name": {"type": "string", "minLength": 1},
                                          "arguments": {"type": "string"}}}}}})}}
    tool = {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"}, "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
            "parameters": {"type": "object"}}}}}
    # A named tool_choice ({"type": "function", "function": {"name": ...}}, which must name one of `tools`)
    # and "required" are accepted too (server_tools.py); a schema cannot say "one of the tools" so they
    # are left out of it, and the fuzzer never sends one that must fail.
    choice = {"enum": ["auto", "none"]}
    return {
        "ChatMessage": message,
        "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")}, **shared,
            "tools": _nullable({"type": "array", "maxItems": 128, "items": tool}), "tool_choice": _nullable(choice),
            "chat_template_kwargs": _nullable({"type": "object", "properties": {
                "enable_thinking": _nullable({"type": "boolean"})}})}},
        "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
            "prompt": {"anyOf": [text, token_ids, {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
                                                   "items": {"anyOf": [text, token_ids]}}]},
            "echo": _nullable({"type": "boolean"}), **shared}},
    }


def _response_schemas(model_name: str) -> dict:
    count, string = {"type": "integer", "minimum": 0}, {"type": "string"}
    finish = {"enum": ["stop", "length", "tool_calls"]}
    head = {"id": string, "created": {"type": "integer"}, "model": {"const": model_name}}
    head_keys = ["id", "object", "created", "model", "choices"]
    choice = dict(index=count, logprobs={"type": "null"})
    call = _closed(["id", "type", "function"], id=string, type={"const": "function"},
                   function=_closed(["name", "arguments"], name=string, arguments=string))
    calls = {"type": "array", "items": call}
    delta_calls = {"type": "array", "items": {**call, "required": ["index", "id", "type", "function"],
                                              "properties": {**call["properties"], "index": count}}}
    reply = _closed(["role", "content"], role={"const": "assistant"}, content=_nullable(string),
                    reasoning_content=string, tool_calls=calls)
    delta = _closed([], role={"const": "assistant"}, content=string, reasoning_content=string,
                    tool_calls=delta_calls)
    usage = _closed(["prompt_tokens", "completion_tokens", "total_tokens"],
                    prompt_tokens=count, completion_tokens=count, total_tokens=count)

    def response(obj: str, choice_schema: dict, streamed: bool) -> dict:
        items = {"type": "array", "items": choice_schema}
        return _closed(head_keys + ([] if streamed else ["usage"]), **head, object={"const": obj}, choices=items,
                       usage=_ref("Usage"))

    return {
        "Usage": usage,
        "ChatCompletion": response("chat.completion", _closed(
            ["index", "message", "logprobs", "finish_reason"], **choice, message=reply, finish_reason=finish), False),
        "ChatCompletionChunk": response("chat.completion.chunk", _closed(
            ["index", "delta", "logprobs", "finish_reason"], **choice, delta=delta,
            finish_reason=_nullable(finish)), True),
        "Completion": response("text_completion", _closed(
            ["index", "text", "logprobs", "finish_reason"], **choice, text=string, finish_reason=finish), False),
        "CompletionChunk": response("text_completion", _closed(
            ["index", "text", "logprobs", "finish_reason"], **choice, text=string,
            finish_reason=_nullable(finish)), True),
        "Model": _closed(["id", "object", "created", "owned_by"], id={"const": model_name},
                         object={"const": "model"}, created={"type": "integer"}, owned_by=string, max_model_len=count),
        "ModelList": _closed(["object", "data"], object={"const": "list"},
                             data={"type": "array", "items": _ref("Model")}),
        "Health": _closed(["status", "model", "auth", "context", "running", "waiting"], status={"const": "ok"},
                          model={"const": model_name}, auth={"type": "boolean"}, context=count, running=count,
                          waiting=count),
        "Error": _closed(["error"], error=_closed(["message", "type", "param", "code"], message=string, type=string,
                                                  param=_nullable(string), code=_nullable(string))),
    }


def openapi_components(model_name: str, max_tokens_cap: int, vocab_size: int) -> dict:
    """The JSON Schemas of requests and responses, with this server's limits filled in."""
    return {**_request_schemas(model_name, max_tokens_cap, vocab_size), **_response_schemas(model_name)}


ERRORS = {400: "invalid request (the error names the field) or context_length_exceeded",
          401: "missing or wrong API key", 404: "no such model", 413: "request body too large",
          429: "queue full: retry later", 500: "generation failed", 503: "the engine is stopping"}


def _sse(chunk: str) -> dict:
    """One Server-Sent Event: `data:` holds a chunk or an error as JSON; the last one is [DONE]."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [_ref(chunk), _ref("Error")]}}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}}}


def operation_doc(ok: str, chunk: str | None = None, request: str | None = None, errors: tuple[int, ...] = (),
                   auth: bool = True) -> dict:
    """An operation's openapi_extra: its request body, its answers (`chunk`: also streamed) and errors."""
    content = {"application/json": {"schema": _ref(ok)}}
    if chunk:  # "stream": true answers 200 with an event stream
        content["text/event-stream"] = {"schema": _sse(chunk)}
    codes = set(errors) | ({400, 404, 413, 429, 500, 503} if request else set()) | ({401} if auth else set())
    out: dict = {"responses": {"200": {"description": "OK", "content": content}, **{
        str(c): {"description": ERRORS[c], "content": {"application/json": {"schema": _ref("Error")}}}
        for c in sorted(codes)}}}
    if request:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    if auth:
        out["security"] = [{"bearer": []}]
    return out


def openapi_document(app, components: dict, auth: bool) -> dict:
    """FastAPI's document for the routes, plus the schemas the operations refer to (built once)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="OpenAI-compatible API of `tinylm serve`")
        parts = doc.setdefault("components", {})
        parts.setdefault("schemas", {}).update(components)
        if auth:
            parts["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = doc
    return app.openapi_schema
