"""Text generation: sampling, a KV-cached batched decoder, and streaming detokenisation.

How a reply is produced (the same code path for `tinylm chat`, `tinylm generate` and the server):

1. **Prefill**: the prompt tokens go through the model once; their keys/values land in a cache row.
2. **Decode**: one new token per step per sequence. Only the newest token is fed; attention reads
   the cached keys/values, and `logits_to_keep=1` skips the vocabulary projection of old positions.
3. **Sample** the next token from the last logits: repetition penalty (CTRL, Keskar et al. 2019),
   OpenAI's frequency / presence penalties, temperature, top-k (Fan et al. 2018), nucleus / top-p (Holtzman et al. 2020); temperature 0 is greedy.
4. **Detokenise incrementally**: a byte-level BPE token can hold half of a UTF-8 character (a Chinese
   character or an emoji often spans 2-4 tokens), so text is only released once it decodes cleanly.
5. **Stop** on an end-of-turn / EOS token, on a stop string (text that *could* be the start of a stop
   string is held back, so a stop string is never shown even when it spans tokens), or at
   `max_new_tokens` / the end of the context.
6. **Think split**: for reasoning models the `<think>...</think>` part is routed to `reasoning`
   (OpenAI-style `reasoning_content`), the rest to `content`.

`BatchGenerator` keeps up to `max_batch` sequences in the rows of one preallocated `StaticKVCache`;
a finished sequence frees its row and a waiting one takes it between two decode steps (continuous
batching, Orca: Yu et al. 2022). `tinylm.inference.engine` runs it in a background thread for the server.
Models that are not tinylm (any transformers causal LM) run through a simple per-sequence
`DynamicCache` fallback with the same interface.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tinylm.models.hf_compat import cache_kwargs, output_cache
from tinylm.text.special_tokens import encode_text

# Temperatures this small are greedy for any practical purpose, and near 1e-38 logits / T overflows
# float32: inf, then NaN probabilities on which sampling raises, failing every sequence of a batched
# engine step (other clients' too). So they decode greedily.
MIN_SAMPLING_TEMPERATURE = 1e-6

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    Args:
        max_new_tokens: hard cap on generated tokens (always honoured).
        temperature: softmax temperature; 0 means greedy (argmax).
        top_k: keep only the k most likely tokens (0 = off).
        top_p: keep the smallest set of tokens whose probability mass reaches p (1.0 = off).
        repetition_penalty: CTRL penalty on tokens already in prompt or output (1.0 = off).
        frequency_penalty: OpenAI's: subtract penalty * count from the logit of every token already
            generated (prompt tokens do not count), so long answers stop repeating; range [-2, 2].
        presence_penalty: OpenAI's: subtract penalty once from every token generated at least once
            (pushes toward new topics); range [-2, 2].
        seed: per-request seed, so a sampled answer is reproducible whatever else is in the batch.
        stop: stop strings; generation ends *before* them and they are never returned.
        stop_token_ids: extra token ids that end generation (the model's EOS / end-of-turn always do).
        ignore_eos: keep going past EOS (benchmarks).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args) -> SamplingParams:
        """From the sampling flags `tinylm chat` / `tinylm generate` share (argparse namespace), validated."""
        params = cls(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                     stop=list(args.stop or []))
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def penalised(self) -> bool:
        """Whether logits depend on the tokens seen so far (no batched argmax shortcut then)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


# ---------------------------------------------------------------------------------------------
# Sampling. All functions take float logits (..., V) and return new logits / token ids.
# ---------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty: for tokens seen before, divide positive logits by `penalty`, multiply negative ones."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                             presence: float) -> torch.Tensor:
    """OpenAI's penalties: logits - frequency * count - presence * (count > 0), counts over generated tokens."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (ties with the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the first token always has mass_before = 0 and stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                 seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> int:
    """Pick one token id from logits (V,); `seen` (bool) and `counts` (generated-token counts) feed the penalties."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and counts is not None:
        logits = apply_frequency_presence(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# Streaming text: incremental detokenisation, stop strings, <think> split.
# ---------------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of complete characters.

    Decodes a short window `ids[prefix:]` and compares it with `ids[prefix:read]` (already shown);
    the new text is released only when it does not end in U+FFFD, the replacement character that a
    partial UTF-8 sequence decodes to. Decoding a window instead of single tokens also keeps the
    spaces that SentencePiece-style tokenizers attach to the next token.
    """

    def __init__(self, tokenizer, hidden_ids: set[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.hidden_ids = hidden_ids or set()
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        if token_id in self.hidden_ids:
            return ""
        self.ids.append(token_id)
        shown = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(shown):]
        return ""

    def flush(self) -> str:
        """Whatever is left (a truly invalid byte sequence comes out as U+FFFD)."""
        shown = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(shown):]


def _partial_suffix(text: str, pattern: str) -> int:
    """Length of the longest proper suffix of `text` that is a prefix of `pattern`."""
    for k in range(min(len(pattern) - 1, len(text)), 0, -1):
        if text.endswith(pattern[:k]):
            return k
    return 0


class StopStringFilter:
    """Hold back text that could be the start of a stop string; cut at the first full match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to show, whether a stop string was found)."""
        self.buffer += text
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out, False
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[:min(hits)], ""
            return out, True
        hold = max(_partial_suffix(self.buffer, s) for s in self.stops)
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class ThinkSplitter:
    """Route text inside `<think>...</think>` to reasoning and the rest to content (tags removed)."""

    def __init__(self, in_think: bool = False) -> None:
        self.in_think = in_think
        self.buffer = ""
        self.after_close = False  # just left a think block: drop the blank lines models put there

    def push(self, text: str) -> tuple[str, str]:
        """Return (reasoning, content) deltas."""
        self.buffer += text
        reasoning, content = [], []
        while self.buffer:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            i = self.buffer.find(tag)
            if i >= 0:
                self._add(self.buffer[:i], reasoning, content)
                self.buffer = self.buffer[i + len(tag):]
                self.after_close = self.in_think
                self.in_think = not self.in_think
                continue
            cut = len(self.buffer) - _partial_suffix(self.buffer, tag)
            self._add(self.buffer[:cut], reasoning, content)
            self.buffer = self.buffer[cut:]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        out, self.buffer = self.buffer, ""
        reasoning, content = [], []
        self._add(out, reasoning, content)
        return "".join(reasoning), "".join(content)

    def _add(self, text: str, reasoning: list[str], content: list[str]) -> None:
        if self.in_think:
            reasoning.append(text)
            return
        if self.after_close:  # only right after </think>: an answer's own leading spaces are kept
            text = text.lstrip()
            self.after_close = not text
        content.append(text)


# ---------------------------------------------------------------------------------------------
# Sequences and model runners.
# ---------------------------------------------------------------------------------------------
@dataclass
class Delta:
    """What one sequence produced in one step (streaming unit)."""

    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"


class Sequence:
    """One request being generated: prompt, sampling state, output ids and the text pipeline."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, stop_ids: set[int],
                 hidden_ids: set[int], split_think: bool = False, in_think: bool = False,
                 on_delta: Callable[[Delta], None] | None = None) -> None:
        params.validate()
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = set() if params.ignore_eos else stop_ids | set(params.stop_token_ids)
        self.output_ids: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer, hidden_ids)
        self.stops = StopStringFilter(params.stop)
        self.think = ThinkSplitter(in_think) if split_think else None
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.seen: torch.Tensor | None = None  # (V,) bool, for the repetition penalty
        self.counts: torch.Tensor | None = None  # (V,) float, generated-token counts (frequency/presence)
        self.on_delta = on_delta
        self.content, self.reasoning = "", ""
        self.finish_reason: str | None = None
        self.row: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, reasoning: str, content: str, finish: str | None = None) -> None:
        self.reasoning += reasoning
        self.content += content
        if (reasoning or content or finish) and self.on_delta is not None:
            self.on_delta(Delta(content=content, reasoning=reasoning, finish_reason=finish))

    def _route(self, text: str) -> tuple[str, str]:
        return self.think.push(text) if self.think else ("", text)

    def append(self, token: int, room_left: bool) -> None:
        """Record a sampled token, stream its text, decide whether the sequence is finished."""
        self.output_ids.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if token in self.stop_ids:
            return self.finish("stop")
        text, hit = self.stops.push(self.detok.add(token))
        self._emit(*self._route(text))
        if hit:
            return self.finish("stop", flush=False)
        if len(self.output_ids) >= self.params.max_new_tokens or not room_left:
            return self.finish("length")

    def finish(self, reason: str, flush: bool = True) -> None:
        if self.finished:
            return
        reasoning, content = "", ""
        if flush:  # text held back for a stop string that never completed is real output
            text, hit = self.stops.push(self.detok.flush())
            text += "" if hit else self.stops.flush()
            reasoning, content = self._route(text)
        if self.think:
            r, c = self.think.flush()
            reasoning, content = reasoning + r, content + c
        self.finish_reason = reason
        self._emit(reasoning, content, reason)


def is_tinylm(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "tinylm"


class StaticRunner:
    """tinylm fast path: all sequences share one preallocated StaticKVCache, one row each."""

    def __init__(self, model, max_batch: int, max_seq_len: int) -> None:
        from tinylm.models.kv_cache import StaticKVCache

        param = next(model.parameters())
        self.model, self.device = model, param.device
        from tinylm.inference import compiled_decode

        if compiled_decode.enabled():  # cache lengths in buckets: one compiled step serves many requests
            max_seq_len = compiled_decode.bucket(max_seq_len)
        self.cache = StaticKVCache(model.config, max_batch, max_seq_len, device=param.device, dtype=param.dtype)
        # Bound on prompt tokens x vocabulary per prefill forward (full logits are materialised).
        self.prefill_budget = 1 << 24
        from tinylm.inference import fast_decode

        # Decode steps through tinylm.inference.fast_decode (lean CPU step, optional int8); TINYLM_FAST_DECODE=0: the forward.
        # Compiled step (tinylm.inference.compiled_decode) where its library is on disk; eager otherwise.
        decoder = compiled_decode.CompiledFastDecoder if compiled_decode.enabled() else fast_decode.FastDecoder
        self.fast = decoder(model) if fast_decode.enabled() and fast_decode.supports(model) is None else None

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Write prompts into fresh rows; return last-position logits (b, V)."""
        self.cache.reset(rows)
        if self.fast is not None:
            self.fast.refresh()  # weights changed since the last request (training rollouts)?
        vocab = self.model.config.vocab_size
        out, start = [], 0
        while start < len(rows):  # group prompts so that b * T * V stays under budget
            end, longest = start + 1, len(prompts[start])
            while end < len(rows) and (end - start + 1) * max(longest, len(prompts[end])) * vocab <= self.prefill_budget:
                longest = max(longest, len(prompts[end]))
                end += 1
            group = prompts[start:end]
            lens = torch.tensor([len(p) for p in group], device=self.device)
            ids = torch.zeros(len(group), int(lens.max()), dtype=torch.long, device=self.device)
            for i, p in enumerate(group):
                ids[i, : len(p)] = torch.tensor(p)
            mask = (torch.arange(ids.shape[1], device=self.device)[None] < lens[:, None]).long()  # right padding
            rows_t = torch.tensor(rows[start:end], device=self.device)
            if len(group) == 1:
                logits = self.model(ids, cache=self.cache, cache_rows=rows_t, logits_to_keep=1).logits[:, -1]
            else:
                logits = self.model(ids, attention_mask=mask, cache=self.cache, cache_rows=rows_t).logits
                logits = logits[torch.arange(len(group)), lens - 1]
            out.append(logits)
            start = end
        return torch.cat(out)

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return logits (b, V)."""
        ids = torch.tensor(tokens, device=self.device)[:, None]
        rows_t = torch.tensor(rows, device=self.device)
        if self.fast is not None:
            return self.fast(self.cache, ids[:, 0], rows_t)
        return self.model(ids, cache=self.cache, cache_rows=rows_t, logits_to_keep=1).logits[:, -1]

    def free(self, row: int) -> None:
        self.cache.reset([row])


class DynamicRunner:
    """Fallback for any transformers causal LM: one DynamicCache per sequence, decoded one by one."""

    def __init__(self, model, max_batch: int, max_seq_len: int) -> None:
        self.model, self.device = model, next(model.parameters()).device
        self.caches: dict[int, object] = {}

    def _forward(self, row: int, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(self.caches[row]))
        self.caches[row] = output_cache(out)
        return out.logits[0, -1].float()

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        from transformers import DynamicCache

        for row in rows:
            self.caches[row] = DynamicCache(config=self.model.config)
        return torch.stack([self._forward(r, p) for r, p in zip(rows, prompts)])

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        return torch.stack([self._forward(r, [t]) for r, t in zip(rows, tokens)])

    def free(self, row: int) -> None:
        self.caches.pop(row, None)


def context_length(model) -> int:
    """Tokens a sequence may hold (prompt + answer); YaRN-extended when the config enables it."""
    from tinylm.models.config import context_length as config_context_length

    return config_context_length(model.config)


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS ids of the generation config and tokenizer, plus the ChatML end-of-turn token."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


def hidden_token_ids(tokenizer) -> set[int]:
    """Special tokens that never appear in streamed text (the <think> and <tool_call> tags do: they are parsed)."""
    keep = {tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE, "<tool_call>", "</tool_call>")}
    return set(tokenizer.all_special_ids) - keep


class BatchGenerator:
    """Continuous batching over the rows of one KV cache (synchronous; see tinylm.inference.engine for threads).

    `add()` queues sequences; each `step()` admits waiting sequences into free rows (prefill, first
    token) and then decodes one token for every running sequence. Finished rows are freed at once.
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_seq_len: int | None = None,
                 cache_slack: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len = min(max_seq_len or context_length(model), context_length(model))
        runner_cls = StaticRunner if is_tinylm(model) else DynamicRunner
        # cache_slack: extra cache slots per row (speculative verification writes k tokens past the end)
        self.runner = runner_cls(model, max_batch, self.max_seq_len + cache_slack)
        self.stop_ids, self.hidden_ids = stop_token_ids(model, tokenizer), hidden_token_ids(tokenizer)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.free_rows = list(range(max_batch - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, **kw) -> Sequence:
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_seq_len}")
        return Sequence(prompt_ids, params, self.tokenizer, self.stop_ids, self.hidden_ids, **kw)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish("cancelled", flush=False)
        self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: Sequence) -> None:
        if seq.row is not None and self.running.get(seq.row) is seq:
            del self.running[seq.row]
            self.runner.free(seq.row)
            self.free_rows.append(seq.row)
            seq.row = None

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence from logits (b, V) and advance them."""
        logits = logits.float()
        if all(s.params.greedy and not s.params.penalised for s in seqs):
            tokens = logits.argmax(dim=-1).tolist()  # one op for the whole batch
        else:
            logits = logits.cpu()  # per-row sampling is cheaper on CPU than many tiny GPU kernels
            tokens = [sample_token(row, s.params, s.generator, s.seen, s.counts) for row, s in zip(logits, seqs)]
        for s, tok in zip(seqs, tokens):
            # room_left: can the new token still be fed (it needs one more cache slot)?
            s.append(tok, room_left=len(s.prompt_ids) + len(s.output_ids) < self.max_seq_len)
            if s.finished:
                self._release(s)

    @torch.inference_mode()
    def step(self) -> None:
        admitted: list[Sequence] = []
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            if seq.finished:  # cancelled while it waited
                continue
            seq.row = self.free_rows.pop()
            self.running[seq.row] = seq
            if seq.params.repetition_penalty != 1.0:
                seq.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
                seq.seen[torch.tensor(seq.prompt_ids)] = True
            if seq.params.frequency_penalty or seq.params.presence_penalty:
                seq.counts = torch.zeros(self.vocab_size)
            admitted.append(seq)
        if admitted:
            logits = self.runner.prefill([s.row for s in admitted], [s.prompt_ids for s in admitted])
            self._accept(admitted, logits)
        batch = [s for s in self.running.values() if s not in admitted]
        if batch:
            self._decode(batch)

    def _decode(self, batch: list[Sequence]) -> None:
        """One new token for each (prefilled) sequence; spec_engine.SpecBatchGenerator overrides it."""
        logits = self.runner.decode([s.row for s in batch], [s.output_ids[-1] for s in batch])
        self._accept(batch, logits)


# ---------------------------------------------------------------------------------------------
# Convenience API.
# ---------------------------------------------------------------------------------------------
def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt token ids for a conversation, ending with the assistant header (message text never
    becomes a control token: see special_tokens.py)."""
    from tinylm.text.chat_format import render_prompt

    return render_prompt(tokenizer, messages, add_generation_prompt=True)


def prompt_opens_think(tokenizer, prompt_ids: list[int]) -> bool:
    """True when the chat template already opened a <think> block (the model continues inside it)."""
    tail = tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False)
    return tail.rstrip().endswith(THINK_OPEN)


@dataclass
class Completion:
    text: str
    reasoning: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str


def generate(model, tokenizer, prompts: list[str] | list[list[int]], params: SamplingParams | None = None,
             max_batch: int = 16, chat: bool = False) -> list[Completion]:
    """Generate for many prompts (strings, token id lists, or with `chat=True` message lists), batched."""
    params = params or SamplingParams()
    encoded = []
    for p in prompts:
        if chat:
            encoded.append(render_chat(tokenizer, p))
        elif isinstance(p, str):  # plain text: special-token strings in it stay text (pass ids for control tokens)
            encoded.append(encode_text(tokenizer, p))
        else:
            encoded.append(list(p))
    max_len = max(len(e) for e in encoded) + params.max_new_tokens
    gen = BatchGenerator(model, tokenizer, max_batch=min(max_batch, len(encoded)), max_seq_len=max_len)
    seqs = [gen.new_sequence(ids, params, split_think=chat, in_think=chat and prompt_opens_think(tokenizer, ids))
            for ids in encoded]
    return run_to_completion(gen, seqs)


def run_to_completion(gen: BatchGenerator, seqs: list[Sequence]) -> list[Completion]:
    """Add `seqs` to `gen`, step until every one finished, and return their completions in order."""
    for s in seqs:
        gen.add(s)
    while gen.has_work():
        gen.step()
    return [Completion(s.content, s.reasoning, s.output_ids, len(s.prompt_ids), s.finish_reason or "stop")
            for s in seqs]


def stream(model, tokenizer, prompt_ids: list[int], params: SamplingParams | None = None,
           split_think: bool = True, generator: BatchGenerator | None = None) -> Iterator[Delta]:
    """Yield Deltas for one prompt as tokens arrive (pass `generator` to reuse its KV cache)."""
    gen = generator or BatchGenerator(model, tokenizer, max_batch=1)
    pending: deque[Delta] = deque()
    seq = gen.new_sequence(prompt_ids, params or SamplingParams(), split_think=split_think,
                           in_think=split_think and prompt_opens_think(tokenizer, prompt_ids), on_delta=pending.append)
    gen.add(seq)
    try:
        while not seq.finished:
            gen.step()
            while pending:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        if not seq.finished:  # the consumer stopped early (Ctrl-C): free the row
            gen.cancel(seq)
