"""A load generator for a running `tinylm serve`: many concurrent streaming chat clients.

Used by tests (tests/test_server_fuzz.py) and benchmarks (bench/server_load.py) to check that the
server keeps serving under concurrency, and that clients which hang up mid-answer free their slots.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass


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

