"""The inference engine: one thread owns the model, many clients share it.

Why a single owner thread: a PyTorch model is not safe to call from several threads at once, and
running requests one after another wastes the machine (decoding one sequence is memory-bound; a
batch of 8 costs little more than 1). So HTTP handlers never touch the model: they `submit()` a
request and receive its text deltas through a callback, while the engine loops - in the main
thread under `tinylm serve` (`run()`, faster on CPU), or in a background thread (`start()`):

    take new requests (bounded queue) -> admit them into free KV-cache rows (prefill)
    -> one decode step for every running sequence -> free finished / cancelled rows -> repeat

New requests join between two decode steps instead of waiting for the whole batch to finish
(continuous / iteration-level batching, Orca: Yu et al., OSDI 2022; vLLM: Kwon et al. 2023).
Bounds: `max_batch` sequences decode together (KV-cache rows); at most `max_queue` more wait;
beyond that `submit` raises `QueueFull` (the server answers 429). A client that disconnects calls
`cancel()` and its row is freed at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable

from tinylm.inference.generate import BatchGenerator, Delta, SamplingParams, Sequence, prompt_opens_think

log = logging.getLogger("tinylm.inference.engine")


class QueueFull(RuntimeError):
    """Too many requests waiting; retry later."""


class EngineStopped(RuntimeError):
    """The engine is not running."""


class Engine:
    """Thread-owned BatchGenerator with a bounded request queue.

    Args:
        model, tokenizer: as returned by `tinylm.models.loading.load_model` (model in eval mode).
        max_batch: sequences decoded together (rows of the KV cache).
        max_queue: requests allowed to wait for a free row.
        max_seq_len: KV-cache length per row (default: the model's context length).
        draft, draft_k: speculative decoding (tinylm/inference/spec_engine.py): a tinylm model with the
            same tokenizer, or "mtp" (the model's own MTP module); None decodes one token per step.
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 max_seq_len: int | None = None, draft=None, draft_k: int = 4) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        if draft is not None and hasattr(model, "vision_tower"):
            raise ValueError("--draft: speculative decoding does not cover vision-language models")
        if hasattr(model, "vision_tower"):  # a VisionLM: requests may carry images (tinylm/inference/vlm_engine.py)
            from tinylm.inference.vlm_engine import VisionBatchGenerator
            self.gen = VisionBatchGenerator(model.eval(), tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
        elif draft is not None:  # speculative decoding (tinylm/inference/spec_engine.py)
            from tinylm.inference.spec_engine import SpecBatchGenerator

            self.gen = SpecBatchGenerator(model.eval(), tokenizer, draft, draft_k, max_batch=max_batch,
                                          max_seq_len=max_seq_len)
        else:
            self.gen = BatchGenerator(model.eval(), tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
        self.max_seq_len = self.gen.max_seq_len
        self._lock = threading.Condition()
        self._inbox: list[Sequence] = []
        self._cancel: list[tuple[Sequence, int]] = []  # (sequence, its output length when cancel() was called)
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        # k -> how many cancelled sequences still got k tokens (decode steps) after cancel() before their
        # row was freed: 0 when cancel() came between two steps, 1 when a step was under way. More would
        # mean that a client who left still costs compute (tests/test_server_fuzz.py and
        # bench/server_load.py check it under load).
        self.cancel_lag: Counter[int] = Counter()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._lock:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="tinylm-engine", daemon=True)
        self._thread.start()
        return self

    def run(self, on_start: Callable[[], None] | None = None) -> None:
        """Run the engine loop in the calling thread until `stop()` (called from another thread);
        `on_start` is called once the engine accepts requests (e.g. to start the HTTP thread).

        Why the main thread: PyTorch's CPU ops run on OpenMP thread teams, one team per thread that
        calls them. The thread that loaded the model already owns a team, so a second one in an
        engine thread makes more OpenMP threads than cores, and libgomp then stops spinning and puts
        its workers to sleep after every parallel op: each op pays a futex wake-up. Measured on the
        2-core VM: a `small` decode step takes ~18 ms in the thread that loaded the model and ~32 ms
        in a new thread (`tinylm serve` therefore runs the HTTP server in a thread and this loop in
        the main thread).
        """
        with self._lock:
            if self._running:
                raise RuntimeError("engine already running")
            self._running = True
        if on_start is not None:
            on_start()
        self._loop()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- client side (any thread) -------------------------------------------------------------
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self.gen.waiting)

    def num_running(self) -> int:
        return len(self.gen.running)

    def spec_stats(self) -> dict | None:
        """Speculative decoding counters (acceptance, tokens per forward), None without a draft."""
        return self.gen.spec_stats() if hasattr(self.gen, "spec_stats") else None

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_delta: Callable[[Delta], None],
               split_think: bool = False, images: list | None = None) -> Sequence:
        """Queue a request; `on_delta` is called from the engine thread. Raises QueueFull / ValueError.
        `images`: PIL images for the prompt's image-pad blocks, in order (a VisionLM engine only)."""
        in_think = split_think and prompt_opens_think(self.tokenizer, prompt_ids)
        if images and not hasattr(self.gen, "vlm"):
            raise ValueError("this model takes no images (it is not a vision-language model)")
        seq = self.gen.new_sequence(prompt_ids, params, split_think=split_think, in_think=in_think,
                                    on_delta=on_delta, **({"images": images} if images else {}))
        with self._lock:
            if not self._running:
                raise EngineStopped("engine is not running")
            free_rows = self.max_batch - len(self.gen.running)
            if self.num_waiting() >= self.max_queue + max(free_rows, 0):
                raise QueueFull(f"server busy: {self.num_running()} running, {self.num_waiting()} waiting")
            self._inbox.append(seq)
            self._lock.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (client gone); its KV-cache row is freed before the next step."""
        with self._lock:
            if not seq.finished:
                self._cancel.append((seq, len(seq.output_ids)))
                self._lock.notify_all()

    # -- engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not (self._inbox or self._cancel or self.gen.has_work()):
                    self._lock.wait(timeout=1.0)
                if not self._running:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancel = self._cancel, []
            for seq in inbox:
                self.gen.add(seq)
            for seq, tokens_then in cancels:
                if not seq.finished:  # not already ended (naturally, or by an earlier cancel of the same request)
                    self.cancel_lag[len(seq.output_ids) - tokens_then] += 1
                self.gen.cancel(seq)
            if not self.gen.has_work():  # only cancellations this round: nothing to decode
                continue
            try:
                self.gen.step()
                self.steps += 1  # decode steps actually run (tests check that a cancelled request stops them)
            except Exception:  # keep serving: fail the sequences of this step, not the server
                log.exception("generation step failed")
                for seq in list(self.gen.running.values()) + list(self.gen.waiting):
                    seq.finish("error", flush=False)
                    self.gen.cancel(seq)
        # Shutdown: end everything still pending so no client waits forever.
        with self._lock:
            pending, self._inbox = self._inbox, []
        for seq in pending + list(self.gen.waiting) + list(self.gen.running.values()):
            self.gen.cancel(seq)

    # -- asyncio helper -----------------------------------------------------------------------
    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     split_think: bool = False, images: list | None = None) -> AsyncIterator[Delta]:
        """Async iterator over the deltas of one request; cancelling the consumer cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        seq = self.submit(prompt_ids, params, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d),
                          split_think=split_think, images=images)
        done = False
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    done = True
                    return
        finally:
            if not done:
                self.cancel(seq)
