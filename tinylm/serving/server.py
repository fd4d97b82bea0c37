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

This module builds the app and the `tinylm serve` command; the rest of tinylm/serving/ does the work:
    server_requests.py   API key, body and fields -> prompts and SamplingParams (400s that name the field)
    server_openapi.py    /openapi.json, built from the same limits
    server_jobs.py       jobs into the engine, deltas back out; a client that leaves cancels its sequences
    server_reply.py      deltas -> an OpenAI JSON body or Server-Sent Events
    server_tools.py      tools, tool_choice, tool_calls      server_vision.py   image_url parts
    server_launch.py     serve_in_main_thread, BackgroundServer, free_port
    server_load.py       run_load: concurrent streaming clients (tests, benchmarks)
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from starlette.requests import Request  # module level: FastAPI resolves handler annotations here
from starlette.responses import Response

from tinylm import __version__
from tinylm.serving import server_reply, server_tools, server_vision
from tinylm.serving.api_error import APIError
from tinylm.serving.server_launch import BackgroundServer, free_port, serve_in_main_thread
from tinylm.serving.server_load import run_load
from tinylm.serving.server_openapi import openapi_components, openapi_document, operation_doc
from tinylm.serving.server_requests import (
    check_key,
    flag,
    parse_messages,
    parse_params,
    parse_prompts,
    read_body,
    with_seed,
)
from tinylm.text.chat_format import render_prompt

# Also the names other code imports from here: those defined in the modules above are re-exported.
__all__ = ["WEB_DIR", "BackgroundServer", "add_cli", "create_app", "free_port", "run_load", "serve_in_main_thread"]

WEB_DIR = Path(__file__).resolve().parents[1] / "web"


class JavaScriptResponse(Response):
    media_type = "text/javascript"


def create_app(engine, model_name: str, api_key: str | None = None, max_tokens_cap: int = 4096,
               default_max_tokens: int = 1024, max_body_bytes: int = 1 << 20):
    """FastAPI app serving `engine` (already started) under the name `model_name`."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="tinylm", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    tokenizer, created = engine.tokenizer, int(time.time())
    components = openapi_components(model_name, max_tokens_cap, len(tokenizer))
    app.openapi = lambda: openapi_document(app, components, api_key is not None)
    doc = functools.partial(operation_doc, auth=api_key is not None)
    body_of = functools.partial(read_body, api_key=api_key, max_body_bytes=max_body_bytes, model_name=model_name)
    respond = functools.partial(server_reply.respond, engine, model_name)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)  # 405 keeps its Allow

    @app.get("/health", openapi_extra=doc("Health", auth=False))
    async def health():
        out = {"status": "ok", "model": model_name, "auth": api_key is not None, "context": engine.max_seq_len,
               "running": engine.num_running(), "waiting": engine.num_waiting()}
        spec = getattr(engine, "spec_stats", lambda: None)()
        return {**out, "speculative": spec} if spec is not None else out

    @app.get("/v1/models", openapi_extra=doc("ModelList"))
    async def models(request: Request):
        check_key(request, api_key)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm",
                "max_model_len": engine.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}", openapi_extra=doc("Model", errors=(404,)))
    async def model_card(name: str, request: Request):
        check_key(request, api_key)
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tinylm"}

    @app.post("/v1/chat/completions", openapi_extra=doc("ChatCompletion", "ChatCompletionChunk",
                                                        request="ChatCompletionRequest"))
    async def chat_completions(request: Request):
        body = await body_of(request)
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
        jobs = [(ids, with_seed(params, j)) for j in range(n)]
        return await respond(request, body, jobs, split_think=True, chat=True, echo=[""] * n, tool_prefix=prefix,
                             images=images)

    @app.post("/v1/completions", openapi_extra=doc("Completion", "CompletionChunk", request="CompletionRequest"))
    async def completions(request: Request):
        body = await body_of(request)
        prompts, echo_prompt = parse_prompts(body.get("prompt"), tokenizer), flag(body, "echo")
        jobs, echo = [], []
        for p, ids in prompts:
            params, n = parse_params(body, len(ids), engine.max_seq_len, max_tokens_cap, default_max_tokens)
            text = (p if isinstance(p, str) else tokenizer.decode(ids)) if echo_prompt else ""
            for j in range(n):
                jobs.append((ids, with_seed(params, j)))
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
    from tinylm.inference.compiled_decode import prebuild, set_mode

    set_mode(args.compile)  # the compiled decode step (tinylm/inference/compiled_decode.py)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_seq_len=args.max_seq_len, draft=draft, draft_k=args.draft_k)
    if args.compile:
        ready = prebuild(engine.gen)
        print(f"compiled decode step: {ready} librar{'y' if ready == 1 else 'ies'} ready (1-3 running requests)"
              if ready else "compiled decode step: not used for this model (eager decode step)")
    app = create_app(engine, name, api_key=args.api_key, max_tokens_cap=args.max_tokens_cap,
                     default_max_tokens=args.default_max_tokens,
                     **({"max_body_bytes": server_vision.MAX_BODY_BYTES} if vlm else {}))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it")
    print(f"tinylm serve: model '{name}' at http://{args.host}:{args.port}/ (API: /v1, web page: /)")
    return serve_in_main_thread(engine, uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                                                      log_level="info")))


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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU fp32/int8: build (once per machine, ~10 s each) and use the compiled decode step "
                        "for 1-3 running requests before serving; default: use such libraries when already "
                        "built (TINYLM_COMPILE_DECODE=auto)")
    p.set_defaults(func=_cmd_serve)
