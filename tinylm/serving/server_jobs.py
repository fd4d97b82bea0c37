"""The bridge between one HTTP request and the shared engine: its jobs in, their deltas out.

The engine (tinylm/inference/engine.py) decodes in its own thread and reports each new piece of
text through a callback; here those callbacks become an asyncio queue the request's handler reads.
A client that goes away (closed tab, Ctrl-C, timeout) is noticed by a task that waits for the ASGI
`http.disconnect` message from the moment its request is queued, independently of the token flow:
its sequences are cancelled and the engine frees their KV-cache rows before its next decode step,
whether the request was streaming or not, queued or mid-answer.
"""

from __future__ import annotations

import asyncio

from tinylm.inference.generate import SamplingParams
from tinylm.serving.api_error import APIError


def submit(engine, request, jobs: list[tuple[list[int], SamplingParams]], split_think: bool,
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
    return seqs, queue, asyncio.create_task(watch(engine, request, seqs, queue))


async def watch(engine, request, seqs: list, queue: asyncio.Queue) -> None:
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


async def events(engine, seqs: list, queue: asyncio.Queue, watcher: asyncio.Task):
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
        release(engine, seqs, queue, watcher)


def release(engine, seqs: list, queue: asyncio.Queue, watcher: asyncio.Task) -> None:
    """Stop watching and cancel what is still running: the engine's rows go back to other clients."""
    watcher.cancel()
    for s in seqs:
        if not s.finished:
            engine.cancel(s)
