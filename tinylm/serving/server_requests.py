"""Request parsing for `tinylm serve`: the API key, the body, and its fields into prompts and SamplingParams.

Plain functions, not pydantic models: every error is an OpenAI-shaped 400 (api_error.py) that names
the offending field, where FastAPI would answer a 422 no OpenAI client understands. The limits below
are also what /openapi.json publishes (server_openapi.py builds the schemas from them), so the two
cannot drift apart; tests/test_server_fuzz.py holds them to each other.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import replace

from tinylm.inference.generate import SamplingParams
from tinylm.serving import server_tools, server_vision
from tinylm.serving.api_error import APIError
from tinylm.text.special_tokens import encode_text

ROLES = {"system", "developer", "user", "assistant", "tool"}
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


def brief(value: object, limit: int = 60) -> str:
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
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {brief(value)}",
                       param=name)
    if not lo <= number <= hi:
        raise APIError(400, f"'{name}' must be in [{lo}, {hi}], got {brief(value)}", param=name)
    return number


def flag(body: dict, name: str, param: str | None = None) -> bool:
    """A JSON boolean, null meaning false: "stream": "false" must not quietly mean true."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{param or name}' must be a boolean, got {brief(value)}", param=param or name)
    return value


def parse_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) from "stream" and "stream_options"."""
    stream, options = flag(body, "stream"), body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return stream, flag(options, "include_usage", "stream_options.include_usage")


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


def check_key(request, api_key: str | None) -> None:
    """A 401 unless the request carries `Authorization: Bearer api_key` (compared in constant time)."""
    if api_key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                       type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_body(request, api_key: str | None, max_body_bytes: int, model_name: str) -> dict:
    """The request's JSON object, after the key check; read in chunks so that an oversized body is a
    413 without being held in memory, whatever its Content-Length claims."""
    check_key(request, api_key)
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
        raise APIError(400, f"'model' must be a string, got {brief(model)}", param="model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server has '{model_name}'",
                       param="model", code="model_not_found")
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
        ignore_eos=flag(body, "ignore_eos"),  # vLLM extension (benchmarks)
    )
    if params.seed is not None and params.seed < 0:
        params.seed &= (1 << 63) - 1
    return params, _number(body, "n", 1, *NUMBERS["n"])


def with_seed(params: SamplingParams, j: int) -> SamplingParams:
    """Choice j of n gets seed+j (different samples, each reproducible)."""
    if j == 0:
        return params
    return replace(params, seed=None if params.seed is None else params.seed + j)
