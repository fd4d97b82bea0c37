"""`tinylm serve`: an OpenAI-compatible HTTP API and a chat web page for one model.

Any OpenAI client (the `openai` Python package, LangChain, Open-WebUI, FastGPT, curl) talks to it:

    GET  /v1/models                 the served model
    POST /v1/chat/completions       messages -> reply (JSON, or Server-Sent Events with "stream": true)
    POST /v1/completions            raw prompt -> continuation
    GET  /health                    liveness + queue sizes (no key needed)
    GET  /openapi.json              OpenAPI 3.1 description: request and response schemas, limits, errors
    GET  /                          the web page (tinylm/web/index.html + chat.js, no CDN, works offline)

The handlers only validate and format; the model lives in one `tinylm.inference.engine.Engine` loop that
batches all requests together (continuous batching); `tinylm serve` runs that loop in the main
thread and the HTTP server in another (decoding is faster there: `Engine.run`). Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` so client libraries raise the right exception.
Binds 127.0.0.1 by default: exposing a model to a network is an explicit choice (use --api-key).

A client that goes away (closed tab, Ctrl-C, timeout) is noticed by a task that waits for the ASGI
`http.disconnect` message from the moment its request is queued, independently of the token flow:
its sequences are cancelled and the engine frees their KV-cache rows before its next decode step,
whether the request was streaming or not, queued or mid-answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request  # module level: FastAPI resolves handler annotations here
from starlette.responses import Response

from tinylm import __version__
from tinylm.inference.generate import SamplingParams
from tinylm.serving import server_tools, server_vision
from tinylm.serving.api_error import APIError
from tinylm.text.chat_format import render_prompt
from tinylm.text.special_tokens import encode_text

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
ROLES = {"system", "developer", "user", "assistant", "tool"}


# ---------------------------------------------------------------------------------------------
# Request validation (plain functions: every message names the offending field). The limits below
# are also what /openapi.json publishes (openapi_components), so the two cannot drift apart.
# ---------------------------------------------------------------------------------------------
NUMBERS = {  # name: (lowest, highest, integer); null or absent means the default
    "temperature": (0.0, 2.0, False),
    "top_p": (1e-6, 1.0, False),
    "top_k": (0, 1 << 20, True),
    "repetition_penalty": (0.01, 10.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "seed": (-(1 << 63), (1 << 63) - 1, True),
    "n": (1, 8, True),
}
MAX_STOPS, MAX_PROMPTS = 16, 16
# Output that could still become a stop string is held back; the token that breaks a long partial
# match costs time quadratic in the stop string's length (64k characters: ~0.1 s, times 16 stop
# strings) inside the engine loop that every client shares. Bounded, so no request can stall it.
MAX_STOP_CHARS = 1000


def _brief(value: object, limit: int = 60) -> str:
    """repr() for an error message, cut short: a client's megabyte string is not echoed back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _as_int(value: object) -> int | None:
    """The integer a JSON value stands for, or None. JSON (and JSON Schema) has one number type, so
    5.0 is the integer 5 as some clients write it; true is not the integer 1."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    number = value if isinstance(value, float) and not integer else _as_int(value)
    if number is None:
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {_brief(value)}",
                       param=name)
    if not lo <= number <= hi:
        raise APIError(400, f"'{name}' must be in [{lo}, {hi}], got {_brief(value)}", param=name)
    return number


def _flag(body: dict, name: str, param: str | None = None) -> bool:
    """A JSON boolean, null meaning false: "stream": "false" must not quietly mean true."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{param or name}' must be a boolean, got {_brief(value)}", param=param or name)
    return value


def parse_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) from "stream" and "stream_options"."""
    stream, options = _flag(body, "stream"), body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return stream, _flag(options, "include_usage", "stream_options.include_usage")


def parse_json(raw: bytes) -> object:
    """The request body as JSON that is also Unicode text. Python's json.loads lets lone UTF-16
    surrogates through (as "\\ud800" escapes, or UTF-8-encoded if given bytes), and no tokenizer or
    UTF-8 encoder takes those; a body nested thousands deep must be a 400, not a RecursionError."""
    try:
        text = raw.decode("utf-8")  # strict: encoded surrogates are an error here
        body = json.loads(text)
        if "\\u" in text:  # an escape may spell half a surrogate pair
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    except UnicodeEncodeError:
        raise APIError(400, "request body has a lone UTF-16 surrogate escape (e.g. \"\\ud800\"): not Unicode text"
                       ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid UTF-8 JSON: {str(e)[:200]}") from None
    return body


def parse_messages(raw: object) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES:  # an unhashable role must not reach `in`
            raise APIError(400, f"messages[{i}] needs a 'role' in {sorted(ROLES)}", param=f"messages[{i}].role")
        content, images = m.get("content"), []
        if isinstance(content, list):  # content parts: text, and images for a VLM (server_vision.py)
            content, images = server_vision.parse_parts(content, i)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or text parts", param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content, **({"images": images} if images else {})})
        out[-1].update(server_tools.message_fields(m, i))  # tool_calls / tool_call_id (server_tools.py)
    return out


def parse_prompts(raw: object, tokenizer) -> list[tuple[object, list[int]]]:
    """(prompt as sent, its token ids) for each prompt of a /v1/completions request."""
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_as_int(t) is not None for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_PROMPTS:
        raise APIError(400, f"'prompt' must be a string, a token array, or an array of at most {MAX_PROMPTS} "
                            "of them", param="prompt")
    out = []
    for k, p in enumerate(raw):
        if isinstance(p, str):
            ids = encode_text(tokenizer, p)  # no control tokens from text; token arrays may carry them
        elif isinstance(p, list) and p:
            ids = [_as_int(t) for t in p]
            if not all(i is not None and 0 <= i < len(tokenizer) for i in ids):
                raise APIError(400, f"prompt[{k}] has a token id outside [0, {len(tokenizer)})", param="prompt")
        else:
            raise APIError(400, f"prompt[{k}] must be a non-empty string or array of token ids", param="prompt")
        if not ids:
            raise APIError(400, f"prompt[{k}] is empty", param="prompt")
        out.append((p, ids))
    return out


def parse_params(body: dict, prompt_len: int, context: int, max_tokens_cap: int, default_max_tokens: int,
                 ) -> tuple[SamplingParams, int]:
    """SamplingParams and n from an OpenAI request body; checks the context budget."""
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context} tokens",
                       param="messages", code="context_length_exceeded")
    limits = {k: _number(body, k, None, 1, max_tokens_cap, integer=True)
              for k in ("max_tokens", "max_completion_tokens")}  # both checked, the newer name wins
    name = "max_completion_tokens" if limits["max_completion_tokens"] is not None else "max_tokens"
    max_tokens = limits[name]
    if max_tokens is None:  # the cap bounds the default too (a server's --default-max-tokens may exceed it)
        max_tokens = min(default_max_tokens, max_tokens_cap, room)
    elif prompt_len + max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens; the prompt has {prompt_len} and "
                            f"{name}={max_tokens} asks for {prompt_len + max_tokens}. Reduce the prompt or {name}.",
                       param=name, code="context_length_exceeded")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or \
            not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"'stop' must be a string or an array of at most {MAX_STOPS} strings, each at most "
                            f"{MAX_STOP_CHARS} characters", param="stop")
    temperature = float(_number(body, "temperature", 1.0, *NUMBERS["temperature"]))
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,  # below MIN_SAMPLING_TEMPERATURE it decodes greedily (generate.py)
        top_p=float(_number(body, "top_p", 1.0, *NUMBERS["top_p"])),
        top_k=_number(body, "top_k", 0, *NUMBERS["top_k"]),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, *NUMBERS["repetition_penalty"])),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, *NUMBERS["frequency_penalty"])),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, *NUMBERS["presence_penalty"])),
        seed=_number(body, "seed", None, *NUMBERS["seed"]),
        stop=stop,
        ignore_eos=_flag(body, "ignore_eos"),  # vLLM extension (benchmarks)
    )
    if params.seed is not None and params.seed < 0:
        params.seed &= (1 << 63) - 1
    return params, _number(body, "n", 1, *NUMBERS["n"])


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _finish_tools(reason: str | None, tools) -> str:
    """`_finish`, or "tool_calls" when the reply (a server_tools.ReplyTools) made calls."""
    return tools.finish_reason(_finish(reason)) if tools is not None else _finish(reason)


# ---------------------------------------------------------------------------------------------
# GET /openapi.json: what the validators above accept and what the handlers return, as JSON Schema
# written by hand. The handlers read raw JSON and validate it themselves (OpenAI-shaped 400s that
# name the field, instead of FastAPI's 422s), so no pydantic model stands between the two; instead
# tests/test_server_fuzz.py fuzzes the server from this document and fails on any disagreement.
# ---------------------------------------------------------------------------------------------
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


def _operation_doc(ok: str, chunk: str | None = None, request: str | None = None, errors: tuple[int, ...] = (),
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


def _openapi(app, components: dict, auth: bool) -> dict:
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


class JavaScriptResponse(Response):
    media_type = "text/javascript"


# ---------------------------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------------------------
def create_app(engine, model_name: str, api_key: str | None = None, max_tokens_cap: int = 4096,
               default_max_tokens: int = 1024, max_body_bytes: int = 1 << 20):
    """FastAPI app serving `engine` (already started) under the name `model_name`."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="tinylm", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    tokenizer, created = engine.tokenizer, int(time.time())
    components = openapi_components(model_name, max_tokens_cap, len(tokenizer))
    app.openapi = lambda: _openapi(app, components, api_key is not None)
    doc = functools.partial(_operation_doc, auth=api_key is not None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)  # 405 keeps its Allow

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> dict:
        check_key(request)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"request body larger than {max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"request body larger than {max_body_bytes} bytes")
            chunks.append(chunk)
        body = parse_json(b"".join(chunks))
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, f"'model' must be a string, got {_brief(model)}", param="model")
        if model is not None and model != model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server has '{model_name}'",
                           param="model", code="model_not_found")
        return body

    def submit(request: Request, jobs: list[tuple[list[int], SamplingParams]], split_think: bool,
               images: list | None = None):
        """Queue all jobs now (a full queue is a 429 before any response starts); start the client watcher.

        Returns (seqs, deltas queue, watcher task). Deltas arrive as (index, Delta); None means the
        client is gone.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs = []
        try:
            for i, (ids, params) in enumerate(jobs):
                def cb(d, i=i):
                    loop.call_soon_threadsafe(queue.put_nowait, (i, d))
                seqs.append(engine.submit(ids, params, cb, split_think=split_think, images=images))
        except Exception as e:
            for s in seqs:
                engine.cancel(s)
            from tinylm.inference.engine import EngineStopped, QueueFull
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
            if isinstance(e, EngineStopped):
                raise APIError(503, str(e), type="server_error", code="engine_stopped") from None
            if isinstance(e, ValueError):
                raise APIError(400, str(e), code="context_length_exceeded") from None
            raise
        return seqs, queue, asyncio.create_task(watch(request, seqs, queue))

    async def watch(request: Request, seqs: list, queue: asyncio.Queue) -> None:
        """Cancel `seqs` as soon as the client disconnects, whether or not tokens are flowing.

        Waits on the ASGI receive channel (the body is already read, so the next message is
        `http.disconnect`); the 1 s timeout only lets the task end by itself once every sequence
        has finished, should nobody cancel it.
        """
        try:
            while not all(s.finished for s in seqs):
                try:
                    message = await asyncio.wait_for(request.receive(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                if message["type"] == "http.disconnect":
                    break
            else:
                return
        except Exception:  # the connection broke in some other way: the client is gone all the same
            pass
        for s in seqs:
            engine.cancel(s)
        queue.put_nowait(None)

    async def events(seqs: list, queue: asyncio.Queue, watcher: asyncio.Task):
        """Yield (index, Delta, Sequence) until all sequences finish or the client leaves; clean up on exit."""
        left = len(seqs)
        try:
            while left:
                item = await queue.get()
                if item is None:  # client gone (its sequences are already cancelled)
                    return
                i, d = item
                if d.finish_reason is not None:
                    left -= 1
                yield i, d, seqs[i]
        finally:
            release(seqs, queue, watcher)

    def release(seqs: list, queue: asyncio.Queue, watcher: asyncio.Task) -> None:
        watcher.cancel()
        for s in seqs:
            if not s.finished:
                engine.cancel(s)

    def usage(seqs) -> dict:
        p = sum(len(s.prompt_ids) for s in seqs.values())
        c = sum(len(s.output_ids) for s in seqs.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: object) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def respond(request: Request, body: dict, jobs, split_think: bool, chat: bool, echo: list[str],
                      tool_prefix: str | None = None, images: list | None = None):
        streaming, include_usage = parse_stream(body)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        base = {"id": rid, "object": obj + (".chunk" if chat and streaming else ""),
                "created": int(time.time()), "model": model_name}
        submitted = submit(request, jobs, split_think, images)
        if not streaming:
            texts, reasons, finish, seqs = {}, {}, {}, {}
            async with contextlib.aclosing(events(*submitted)) as stream:
                async for i, d, s in stream:
                    texts[i] = texts.get(i, "") + d.content
                    reasons[i] = reasons.get(i, "") + d.reasoning
                    seqs[i] = s
                    if d.finish_reason == "error":
                        raise APIError(500, "generation failed", type="server_error")
                    if d.finish_reason:
                        finish[i] = _finish(d.finish_reason)
            if len(finish) < len(jobs):  # the client left; nobody reads this
                return Response(status_code=499)
            choices = []
            for i in range(len(jobs)):
                if chat:
                    msg = {"role": "assistant", "content": texts.get(i, "")}
                    if tool_prefix is not None:  # tool calls out of the text (server_tools.py)
                        reply = server_tools.ReplyTools(tool_prefix)
                        content, calls = reply.push(texts.get(i, ""), final=True)
                        if calls:
                            msg = {"role": "assistant", "content": content.strip() or None,
                                   "tool_calls": [{k: v for k, v in c.items() if k != "index"} for c in calls]}
                            finish[i] = reply.finish_reason(finish[i])
                    if reasons.get(i):
                        msg["reasoning_content"] = reasons[i]
                    choices.append({"index": i, "message": msg, "logprobs": None, "finish_reason": finish.get(i)})
                else:
                    choices.append({"index": i, "text": echo[i] + texts.get(i, ""), "logprobs": None,
                                    "finish_reason": finish.get(i)})
            return JSONResponse({**base, "choices": choices, "usage": usage(seqs)})

        # Headers go out now, before the first token: a client waiting in the queue sees 200 at once.
        async def gen():
            seqs = {}
            stream = events(*submitted)
            tools = {i: server_tools.ReplyTools(tool_prefix) for i in range(len(jobs))} if tool_prefix is not None \
                else {}
            try:
                if chat:
                    for i in range(len(jobs)):
                        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}]})
                elif any(echo):
                    for i, e in enumerate(echo):
                        yield sse({**base, "choices": [{"index": i, "text": e, "logprobs": None,
                                                        "finish_reason": None}]})
                async for i, d, s in stream:
                    seqs[i] = s
                    if d.finish_reason == "error":
                        yield sse(APIError(500, "generation failed", type="server_error").body())
                        break
                    if chat:
                        delta = {}
                        if d.reasoning:
                            delta["reasoning_content"] = d.reasoning
                        content, calls = (tools[i].push(d.content, final=d.finish_reason is not None) if tools
                                          else (d.content, []))
                        if content:
                            delta["content"] = content
                        if calls:
                            delta["tool_calls"] = calls
                        if delta:
                            yield sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                            "finish_reason": None}]})
                        if d.finish_reason:
                            yield sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                            "finish_reason": _finish_tools(d.finish_reason,
                                                                                           tools.get(i))}]})
                    elif d.content or d.finish_reason:
                        fr = _finish(d.finish_reason) if d.finish_reason else None
                        yield sse({**base, "choices": [{"index": i, "text": d.content, "logprobs": None,
                                                        "finish_reason": fr}]})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(seqs)})
                yield "data: [DONE]\n\n"
            finally:  # also when the response is closed before `stream` started (its finally never runs)
                await stream.aclose()
                release(*submitted)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health", openapi_extra=doc("Health", auth=False))
    async def health():
        out = {"status": "ok", "model": model_name, "auth": api_key is not None, "context": engine.max_seq_len,
               "running": engine.num_running(), "waiting": engine.num_waiting()}
        spec = getattr(engine, "spec_stats", lambda: None)()
        return {**out, "speculative": spec} if spec is not None else out

    @app.get("/v1/models", openapi_extra=doc("ModelList"))
    async def models(request: Request):
        check_key(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm",
                "max_model_len": engine.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}", openapi_extra=doc("Model", errors=(404,)))
    async def model_card(name: str, request: Request):
        check_key(request)
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm"}

    @app.post("/v1/chat/completions", openapi_extra=doc("ChatCompletion", "ChatCompletionChunk",
                                                        request="ChatCompletionRequest"))
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = parse_messages(body.get("messages"))
        images = server_vision.request_images(messages, engine)  # image_url parts (server_vision.py)
        tools = server_tools.parse_tools(body)
        choice = server_tools.parse_tool_choice(body, tools)
        think = server_tools.parse_enable_thinking(body)
        prefix = server_tools.forced_prefix(choice, tools)
        if images:
            ids = server_vision.render(tokenizer, engine, messages, body)
        else:
            ids = render_prompt(tokenizer, messages, tools=tools if prefix is not None else None, enable_thinking=think)
        ids = list(ids) + server_tools.prefix_ids(tokenizer, prefix or "")
        params, n = parse_params(body, len(ids), engine.max_seq_len, max_tokens_cap, default_max_tokens)
        jobs = [(ids, _with_seed(params, j)) for j in range(n)]
        return await respond(request, body, jobs, split_think=True, chat=True, echo=[""] * n, tool_prefix=prefix,
                             images=images)

    @app.post("/v1/completions", openapi_extra=doc("Completion", "CompletionChunk", request="CompletionRequest"))
    async def completions(request: Request):
        body = await read_body(request)
        prompts, echo_prompt = parse_prompts(body.get("prompt"), tokenizer), _flag(body, "echo")
        jobs, echo = [], []
        for p, ids in prompts:
            params, n = parse_params(body, len(ids), engine.max_seq_len, max_tokens_cap, default_max_tokens)
            text = (p if isinstance(p, str) else tokenizer.decode(ids)) if echo_prompt else ""
            for j in range(n):
                jobs.append((ids, _with_seed(params, j)))
                echo.append(text)
        return await respond(request, body, jobs, split_think=False, chat=False, echo=echo)

    # The page's script is a separate same-origin file, so the CSP allows no inline script at all:
    # even if model text ever reached the DOM as markup, an injected <script> or onerror= would not run.
    csp = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                      "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse((WEB_DIR / "index.html").read_text(encoding="utf-8"), headers=csp)

    @app.get("/chat.js", response_class=JavaScriptResponse)
    async def chat_js():
        return JavaScriptResponse((WEB_DIR / "chat.js").read_text(encoding="utf-8"),
                                  headers={**csp, "Cache-Control": "no-cache"})

    return app


def _with_seed(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j of n gets seed+j (different samples, each reproducible)."""
    if j == 0:
        return params
    from dataclasses import replace

    return replace(params, seed=None if params.seed is None else params.seed + j)


# ---------------------------------------------------------------------------------------------
# Running it.
# ---------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (tests, benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """Run an app with uvicorn in a thread (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        port = port or free_port(host)
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class ClientResult:
    """What one streaming client of `run_load` saw (times in seconds from its request)."""

    status: int = 0
    tokens: int = 0  # completion tokens: the usage chunk's count, or content chunks for a client that left
    first_token_s: float | None = None
    done: bool = False  # the stream ended with [DONE]
    left: bool = False  # hung up on purpose, mid-answer


@dataclass
class LoadResult:
    clients: list[ClientResult]
    wall_s: float

    @property
    def server_errors(self) -> int:
        return sum(c.status >= 500 for c in self.clients)

    @property
    def tokens_per_s(self) -> float:
        return sum(c.tokens for c in self.clients) / self.wall_s

    def ttft(self, q: float) -> float:
        """Quantile q of time to first token, over the clients that got one."""
        times = sorted(c.first_token_s for c in self.clients if c.first_token_s is not None)
        return times[min(len(times) - 1, int(q * len(times)))] if times else float("nan")


async def _stream_chat(client, url: str, body: dict, leave_after: int | None) -> ClientResult:
    """One streaming chat request; with `leave_after`, hang up after that many content chunks."""
    out, chunks, t0 = ClientResult(), 0, time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        out.status = r.status_code
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                out.done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    chunks += 1
                    out.first_token_s = out.first_token_s or time.perf_counter() - t0
                    if leave_after is not None and chunks >= leave_after:
                        out.left = True
                        break  # leaving the block closes the connection mid-stream
    out.tokens = out.tokens or chunks
    return out


async def run_load(url: str, clients: int = 32, leave_every: int = 3, leave_after: int = 4, max_tokens: int = 64,
                   timeout: float = 120.0) -> LoadResult:
    """`clients` concurrent streaming chat requests to the server at `url` (tests, benchmarks); every
    `leave_every`-th client (0: none) hangs up after `leave_after` content chunks. Greedy with
    ignore_eos, so the others each get exactly `max_tokens` tokens."""
    import httpx

    body = {"messages": [{"role": "user", "content": "Tell me a long story about a cat."}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*[
            _stream_chat(client, url, body, leave_after if leave_every and i % leave_every == 0 else None)
            for i in range(clients)]), timeout)
    return LoadResult(list(results), time.perf_counter() - t0)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tinylm.inference.chat import load_for_inference
    from tinylm.inference.engine import Engine
    from tinylm.inference.vlm_engine import load_vlm_for_inference
    from tinylm.models.vision import is_vlm_dir

    vlm = is_vlm_dir(args.model_dir)  # a vision-language model: image_url parts too (server_vision.py)
    model, tokenizer = (load_vlm_for_inference if vlm else load_for_inference)(
        args.model_dir, args.lora, args.dtype, args.device, yarn_factor=args.yarn_factor, quantize=args.quantize)
    name = args.model_name or Path(args.model_dir.rstrip("/")).name or "tinylm"
    draft = None
    if args.draft:  # speculative decoding in the engine (tinylm/inference/spec_engine.py)
        from tinylm.inference.chat import load_draft

        draft = load_draft(args.draft, model, tokenizer, args.dtype, args.device)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_seq_len=args.max_seq_len, draft=draft, draft_k=args.draft_k)
    app = create_app(engine, name, api_key=args.api_key, max_tokens_cap=args.max_tokens_cap,
                     default_max_tokens=args.default_max_tokens,
                     **({"max_body_bytes": server_vision.MAX_BODY_BYTES} if vlm else {}))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it")
    print(f"tinylm serve: model '{name}' at http://{args.host}:{args.port}/ (API: /v1, web page: /)")
    return serve_in_main_thread(engine, uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                                                      log_level="info")))


def serve_in_main_thread(engine, server) -> int:
    """HTTP (uvicorn `server`) in a thread, the model (`engine.run`) in this, the main thread, which
    decodes ~1.7x faster there (Engine.run says why). Ctrl-C / SIGTERM / the server stopping (e.g.
    port in use) end both. Returns the exit code: 0, or 1 when the server failed to start."""
    import signal

    def http() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn's way to give up when it cannot start (it logged why)
            pass
        finally:
            engine.stop()

    thread = threading.Thread(target=http, name="tinylm-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: graceful, like Ctrl-C
    try:
        engine.run(on_start=thread.start)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()
        server.should_exit = True
        if thread.is_alive():
            thread.join(timeout=10)
    return 0 if server.started else 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API + web chat page",
                       description="Serve a model over an OpenAI-compatible HTTP API with a chat web page at /.")
    p.add_argument("model_dir", help="model directory (tinylm or transformers causal LM) or a preset name")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--model-name", default=None, help="name clients use (default: the directory name)")
    p.add_argument("--lora", default=None, help="LoRA adapter directory to apply")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that (then 429)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length per sequence (default: context)")
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens accepted")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="max_tokens when a request gives none (never above --max-tokens-cap)")
    p.add_argument("--yarn-factor", type=float, default=1.0,
                   help="serve a tinylm model at this many times its trained context with YaRN (e.g. 4)")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: cuda if available)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: decode with weight-only int8 products on CPU (~2-3x faster, logits within ~1%%)")
    p.add_argument("--draft", default=None,
                   help="speculative decoding: a draft model directory (same tokenizer), or 'mtp' (the model's own MTP module)")
    p.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per row and step")
    p.set_defaults(func=_cmd_serve)
