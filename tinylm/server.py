"""`tinylm serve`: an OpenAI-compatible HTTP API and a chat web page for one model.

Any OpenAI client (the `openai` Python package, LangChain, Open-WebUI, FastGPT, curl) talks to it:

    GET  /v1/models                 the served model
    POST /v1/chat/completions       messages -> reply (JSON, or Server-Sent Events with "stream": true)
    POST /v1/completions            raw prompt -> continuation
    GET  /health                    liveness + queue sizes (no key needed)
    GET  /                          the web page (tinylm/web/index.html + chat.js, no CDN, works offline)

The handlers only validate and format; the model lives in one `tinylm.engine.Engine` loop that
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
import hmac
import json
import threading
import time
import uuid
from pathlib import Path

from starlette.requests import Request  # module level: FastAPI resolves handler annotations here

from tinylm.generate import SamplingParams, render_chat
from tinylm.special_tokens import encode_text

WEB_DIR = Path(__file__).parent / "web"
ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# Request validation (plain functions: every message names the offending field).
# ---------------------------------------------------------------------------------------------
def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def parse_messages(raw: object) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a 'role' in {sorted(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or text parts", param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def parse_params(body: dict, prompt_len: int, context: int, max_tokens_cap: int, default_max_tokens: int,
                 ) -> tuple[SamplingParams, int]:
    """SamplingParams and n from an OpenAI request body; checks the context budget."""
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context} tokens",
                       param="messages", code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, 1, max_tokens_cap, integer=True)
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
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or an array of at most 16 strings", param="stop")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
        top_k=_number(body, "top_k", 0, 0, 1 << 20, integer=True),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0.01, 10.0)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2.0, 2.0)),
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        stop=stop,
        ignore_eos=bool(body.get("ignore_eos", False)),  # vLLM extension (benchmarks)
    )
    if params.seed is not None and params.seed < 0:
        params.seed &= (1 << 63) - 1
    return params, _number(body, "n", 1, 1, 8, integer=True)


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


# ---------------------------------------------------------------------------------------------
# The app.
# ---------------------------------------------------------------------------------------------
def create_app(engine, model_name: str, api_key: str | None = None, max_tokens_cap: int = 4096,
               default_max_tokens: int = 1024, max_body_bytes: int = 1 << 20):
    """FastAPI app serving `engine` (already started) under the name `model_name`."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="tinylm", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer, created = engine.tokenizer, int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

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
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server has '{model_name}'",
                           param="model", code="model_not_found")
        return body

    def submit(request: Request, jobs: list[tuple[list[int], SamplingParams]], split_think: bool):
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
                seqs.append(engine.submit(ids, params, cb, split_think=split_think))
        except Exception as e:
            for s in seqs:
                engine.cancel(s)
            from tinylm.engine import EngineStopped, QueueFull
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

    async def respond(request: Request, body: dict, jobs, split_think: bool, chat: bool, echo: list[str]):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        base = {"id": rid, "object": obj + (".chunk" if chat and body.get("stream") else ""),
                "created": int(time.time()), "model": model_name}
        opts = body.get("stream_options") or {}
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        submitted = submit(request, jobs, split_think)
        if not body.get("stream"):
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
                        if d.content:
                            delta["content"] = d.content
                        if delta:
                            yield sse({**base, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                            "finish_reason": None}]})
                        if d.finish_reason:
                            yield sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                            "finish_reason": _finish(d.finish_reason)}]})
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

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "auth": api_key is not None, "context": engine.max_seq_len,
                "running": engine.num_running(), "waiting": engine.num_waiting()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm",
                "max_model_len": engine.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str, request: Request):
        check_key(request)
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = parse_messages(body.get("messages"))
        ids = render_chat(tokenizer, messages)
        params, n = parse_params(body, len(ids), engine.max_seq_len, max_tokens_cap, default_max_tokens)
        jobs = [(ids, _with_seed(params, j)) for j in range(n)]
        return await respond(request, body, jobs, split_think=True, chat=True, echo=[""] * n)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len(prompt) > 16:
            raise APIError(400, "'prompt' must be a string, a token array, or an array of at most 16 of them",
                           param="prompt")
        jobs, echo = [], []
        for k, p in enumerate(prompt):
            if isinstance(p, str):
                ids = encode_text(tokenizer, p)  # no control tokens from text; token arrays may carry them
            elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in p):
                ids = list(p)
            else:
                raise APIError(400, f"prompt[{k}] must be a non-empty string or array of token ids", param="prompt")
            if not ids:
                raise APIError(400, f"prompt[{k}] is empty", param="prompt")
            params, n = parse_params(body, len(ids), engine.max_seq_len, max_tokens_cap, default_max_tokens)
            text = (p if isinstance(p, str) else tokenizer.decode(ids)) if body.get("echo") else ""
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

    @app.get("/chat.js")
    async def chat_js():
        return Response((WEB_DIR / "chat.js").read_text(encoding="utf-8"), media_type="text/javascript",
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


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tinylm.chat import load_for_inference
    from tinylm.engine import Engine

    model, tokenizer = load_for_inference(args.model_dir, args.lora, args.dtype, args.device,
                                          yarn_factor=args.yarn_factor)
    name = args.model_name or Path(args.model_dir.rstrip("/")).name or "tinylm"
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_seq_len=args.max_seq_len)
    app = create_app(engine, name, api_key=args.api_key, max_tokens_cap=args.max_tokens_cap,
                     default_max_tokens=args.default_max_tokens)
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
    p.set_defaults(func=_cmd_serve)
