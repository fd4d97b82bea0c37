"""The answer to a generation request: the engine's deltas as an OpenAI JSON body or as Server-Sent Events.

Both endpoints share it: /v1/chat/completions (`chat`: messages with reasoning and tool calls) and
/v1/completions (plain text, optionally echoing the prompt). The jobs are queued before anything is
sent (server_jobs.py), so a full queue is a 429, not a stream that breaks; a streamed answer then
sends its headers at once, so a client waiting in the queue sees 200 before its first token.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from starlette.responses import JSONResponse, Response, StreamingResponse

from tinylm.serving import server_jobs, server_tools
from tinylm.serving.api_error import APIError
from tinylm.serving.server_requests import parse_stream


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _finish_tools(reason: str | None, tools) -> str:
    """`_finish`, or "tool_calls" when the reply (a server_tools.ReplyTools) made calls."""
    return tools.finish_reason(_finish(reason)) if tools is not None else _finish(reason)


def usage(seqs) -> dict:
    p = sum(len(s.prompt_ids) for s in seqs.values())
    c = sum(len(s.output_ids) for s in seqs.values())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def respond(engine, model_name: str, request, body: dict, jobs, split_think: bool, chat: bool,
                  echo: list[str], tool_prefix: str | None = None, images: list | None = None):
    """Run `jobs` (one per choice) on `engine` and answer `request` as its body asks: JSON or a stream."""
    streaming, include_usage = parse_stream(body)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    obj = "chat.completion" if chat else "text_completion"
    base = {"id": rid, "object": obj + (".chunk" if chat and streaming else ""),
            "created": int(time.time()), "model": model_name}
    submitted = server_jobs.submit(engine, request, jobs, split_think, images)
    if not streaming:
        return await _reply_json(engine, submitted, base, len(jobs), chat, echo, tool_prefix)
    # Headers go out now, before the first token: a client waiting in the queue sees 200 at once.
    chunks = _reply_events(engine, submitted, base, len(jobs), chat, echo, tool_prefix, include_usage)
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _reply_json(engine, submitted, base: dict, n: int, chat: bool, echo: list[str], tool_prefix: str | None):
    """The whole answer as one JSON body, once every choice has finished."""
    texts, reasons, finish, seqs = {}, {}, {}, {}
    async with contextlib.aclosing(server_jobs.events(engine, *submitted)) as stream:
        async for i, d, s in stream:
            texts[i] = texts.get(i, "") + d.content
            reasons[i] = reasons.get(i, "") + d.reasoning
            seqs[i] = s
            if d.finish_reason == "error":
                raise APIError(500, "generation failed", type="server_error")
            if d.finish_reason:
                finish[i] = _finish(d.finish_reason)
    if len(finish) < n:  # the client left; nobody reads this
        return Response(status_code=499)
    choices = []
    for i in range(n):
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


async def _reply_events(engine, submitted, base: dict, n: int, chat: bool, echo: list[str], tool_prefix: str | None,
                        include_usage: bool):
    """The answer as Server-Sent Events: an opening chunk per choice, then its pieces as they come, then [DONE]."""
    seqs = {}
    stream = server_jobs.events(engine, *submitted)
    tools = {i: server_tools.ReplyTools(tool_prefix) for i in range(n)} if tool_prefix is not None else {}
    try:
        if chat:
            for i in range(n):
                yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        elif any(echo):
            for i, e in enumerate(echo):
                yield sse({**base, "choices": [{"index": i, "text": e, "logprobs": None, "finish_reason": None}]})
        async for i, d, s in stream:
            seqs[i] = s
            if d.finish_reason == "error":
                yield sse(APIError(500, "generation failed", type="server_error").body())
                break
            if chat:
                for chunk in _chat_chunks(base, i, d, tools):
                    yield sse(chunk)
            elif d.content or d.finish_reason:
                fr = _finish(d.finish_reason) if d.finish_reason else None
                yield sse({**base, "choices": [{"index": i, "text": d.content, "logprobs": None,
                                                "finish_reason": fr}]})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(seqs)})
        yield "data: [DONE]\n\n"
    finally:  # also when the response is closed before `stream` started (its finally never runs)
        await stream.aclose()
        server_jobs.release(engine, *submitted)


def _chat_chunks(base: dict, i: int, d, tools: dict) -> list[dict]:
    """The chunks of one chat Delta for choice i: its reasoning, text and whole tool calls (if any),
    then the finish reason when it is the last. `tools` holds each choice's ReplyTools, or is empty."""
    out, delta = [], {}
    if d.reasoning:
        delta["reasoning_content"] = d.reasoning
    content, calls = (tools[i].push(d.content, final=d.finish_reason is not None) if tools
                      else (d.content, []))
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = calls
    if delta:
        out.append({**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]})
    if d.finish_reason:
        out.append({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                         "finish_reason": _finish_tools(d.finish_reason, tools.get(i))}]})
    return out
