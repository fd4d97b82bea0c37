"""Speculative decoding: a cheap draft proposes k tokens, the target checks them in one forward.

Why: at batch 1 a decode step is bound by reading the weights, so scoring k+1 positions costs about
as much as scoring one. If the draft guesses well, each target forward yields several tokens.

The accept / reject rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling") keeps the
output distributed exactly as the target's: draft token d ~ q is accepted with probability
min(1, p(d) / q(d)); at the first rejection the token is drawn from norm(max(0, p - q)); when all k
are accepted a bonus token is drawn from the target's next distribution. p and q are the *processed*
distributions (temperature, top-k, top-p); greedy decoding uses one-hot distributions, which turns
the rule into "accept while the draft equals the target's argmax", so greedy output equals plain
greedy decoding.

Both models keep a batch-1 `StaticKVCache`; rejecting tokens is a rollback of `seq_lens`, since the
buffers are written in place (nothing to copy). Drafts: any tinylm model with the same tokenizer
(`tinylm generate --draft DIR`). Text, stop strings and stop tokens go through generate.Sequence,
so the output pipeline is the one plain decoding uses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tinylm.inference.generate import (
    SamplingParams,
    Sequence,
    context_length,
    hidden_token_ids,
    stop_token_ids,
    top_k_filter,
    top_p_filter,
)
from tinylm.models.kv_cache import StaticKVCache


@dataclass
class SpecStats:
    """Counters of one speculative generation."""

    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0  # of which the target kept
    target_forwards: int = 0  # verification forwards (the prefill not counted)
    tokens: int = 0  # tokens emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.target_forwards, 1)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., V) -> the probabilities plain decoding samples from (one-hot argmax when greedy)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p).softmax(-1)


def verify(drafts: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """The accept / reject rule. drafts (k tokens) were sampled from q (k, V); p (k+1, V) are the
    target's distributions at the same positions plus one. Returns the accepted prefix of drafts and
    one more token (the correction, or the bonus when all were accepted): between 1 and k+1 tokens."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        u = torch.rand((), generator=generator).item()
        if u * q[i, d].item() < p[i, d].item():  # u < p/q, written without dividing by q = 0
            out.append(d)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        dist = residual if residual.sum() > 0 else p[i]
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=generator)))
    return out


class CachedLM:
    """A tinylm model with a batch-1 static cache that can be rolled back: `n` tokens are cached."""

    def __init__(self, model, max_len: int) -> None:
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.cache = StaticKVCache(model.config, 1, max_len, device=param.device, dtype=param.dtype)
        self.n = 0

    def feed(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append tokens; return their final hidden states (T, H) and next-token logits (T, V)."""
        x = torch.tensor([tokens], device=self.device)
        hidden, _ = self.model.model(x, cache=self.cache)
        self.n += len(tokens)
        return hidden[0], self.model.lm_head(hidden[0]).float().cpu()

    def rollback(self, n: int) -> None:
        self.cache.seq_lens[0] = n
        self.n = n


class DraftProposer:
    """Proposals from a separate small model with its own cache (rolled back on rejection)."""

    def __init__(self, draft, max_len: int) -> None:
        self.lm = CachedLM(draft, max_len)

    def propose(self, ids: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], torch.Tensor]:
        drafts, qs = [], []
        logits = self.lm.feed(ids[self.lm.n:])[1][-1]  # the tokens accepted since the last round
        for i in range(k):
            qs.append(distribution(logits, params))
            drafts.append(int(torch.multinomial(qs[-1], 1, generator=generator)))
            if i < k - 1:
                logits = self.lm.feed(drafts[-1:])[1][-1]
        return drafts, torch.stack(qs)

    def observe(self, start: int, hidden: torch.Tensor) -> None:
        """The target's hidden states of positions start.. (unused by a separate draft)."""

    def accepted(self, n_valid: int) -> None:
        """Only the first n_valid tokens of the sequence are right: forget cached drafts beyond."""
        self.lm.rollback(min(self.lm.n, n_valid))


class MTPProposer:
    """Self-speculation with the first MTP module (DeepSeek-V3 §5.4.3: one extra token per step).

    Position i of the module needs the target's hidden state h_i and the token t_{i+1}; its own
    block keeps a static cache of those positions (only accepted tokens enter it, so it never rolls
    back). Proposes one token: the module's guess for the token after the newest.
    """

    def __init__(self, target, max_len: int) -> None:
        if not getattr(target, "mtp", None):
            raise ValueError("self-speculation needs a model trained with mtp_depth >= 1 (tinylm/models/mtp.py)")
        cfg = copy.copy(target.config)
        cfg.num_hidden_layers = target.config.num_hidden_layers + 1  # the module's block is layer L
        param = next(target.parameters())
        self.cache = StaticKVCache(cfg, 1, max_len, device=param.device, dtype=param.dtype)
        for i in range(target.config.num_hidden_layers):  # slots of the main layers: not needed here
            self.cache.keys[i] = self.cache.values[i] = torch.empty(0)
        self.target, self.module, self.device = target, target.mtp.layers[0], param.device
        self.n = 0  # positions fed to the module
        self.hidden: dict[int, torch.Tensor] = {}  # target hidden states of positions not yet fed

    def observe(self, start: int, hidden: torch.Tensor) -> None:
        for j in range(hidden.shape[0]):
            self.hidden[start + j] = hidden[j]

    def accepted(self, n_valid: int) -> None:
        for pos in [p for p in self.hidden if p >= n_valid]:
            del self.hidden[pos]

    def propose(self, ids: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], torch.Tensor]:
        positions = list(range(self.n, len(ids) - 1))
        h = torch.stack([self.hidden.pop(p) for p in positions])[None]  # (1, T, H)
        emb = self.target.model.embed_tokens(torch.tensor([ids[self.n + 1:]], device=self.device))  # t_{i+1}
        pos, key_valid = self.cache.begin(torch.zeros(1, dtype=torch.long, device=self.device), len(positions))
        cos, sin = self.target.model.rope(pos, h.dtype)
        out, _ = self.module(h, emb, cos, sin, key_valid[:, None], self.cache)
        self.cache.end(torch.tensor([len(positions)], device=self.device))
        self.n = len(ids) - 1
        q = distribution(self.target.lm_head(self.module.norm(out[0, -1])).float().cpu(), params)
        return [int(torch.multinomial(q, 1, generator=generator))], q[None]


def check_pair(target, draft) -> None:
    """Both tinylm models with the same vocabulary, or a ValueError saying which is not."""
    for name, m in (("target", target), ("draft", draft)):
        if getattr(m.config, "model_type", None) != "tinylm":
            raise ValueError(f"speculative decoding: the {name} model is not a tinylm model "
                             f"(model_type {getattr(m.config, 'model_type', None)!r}); `tinylm import` it first")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"speculative decoding: draft vocab_size {draft.config.vocab_size} != target "
                         f"vocab_size {target.config.vocab_size} (the draft must share the target's tokenizer)")


@torch.inference_mode()
def speculative_generate(target, draft, tokenizer, prompt_ids: list[int], params: SamplingParams | None = None,
                         k: int = 4, split_think: bool = False, in_think: bool = False) -> tuple[Sequence, SpecStats]:
    """Generate for one prompt; `draft` (a tinylm model with the target's tokenizer) proposes k tokens
    per target forward, or with draft="mtp" the target's own first MTP module proposes one.
    split_think / in_think: the <think> routing of generate.Sequence."""
    params = params or SamplingParams()
    if params.penalised:
        raise ValueError("speculative decoding does not support repetition / frequency / presence penalties")
    if k < 1:
        raise ValueError(f"speculative k must be >= 1, got {k}")
    if draft != "mtp":
        check_pair(target, draft)
    seq = Sequence(prompt_ids, params, tokenizer, stop_token_ids(target, tokenizer), hidden_token_ids(tokenizer),
                   split_think=split_think, in_think=in_think)
    limit = context_length(target) if draft == "mtp" else min(context_length(target), context_length(draft))
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context holds {limit}")
    max_len = min(len(prompt_ids) + params.max_new_tokens + k + 1, limit + k + 1)
    tgt = CachedLM(target, max_len)
    proposer = MTPProposer(target, max_len) if draft == "mtp" else DraftProposer(draft, max_len)
    k = 1 if draft == "mtp" else k
    stats, ids = SpecStats(), list(prompt_ids)
    hidden, logits = tgt.feed(ids)
    proposer.observe(0, hidden)
    first = verify([], torch.empty(0), distribution(logits[-1:], params), seq.generator)[0]
    ids.append(first)
    seq.append(first, room_left=len(ids) < limit)
    while not seq.finished:
        steps = max(1, min(k, limit - len(ids)))  # never run past the context
        drafts, q = proposer.propose(ids, steps, params, seq.generator)
        hidden, logits = tgt.feed(ids[-1:] + drafts)  # positions len(ids)-1 .. len(ids)-1+steps
        new = verify(drafts, q, distribution(logits, params), seq.generator)
        n_ok = len(new) - 1  # accepted drafts (the last token is a correction or the bonus)
        stats.proposed, stats.accepted, stats.target_forwards = stats.proposed + steps, stats.accepted + n_ok, \
            stats.target_forwards + 1
        tgt.rollback(len(ids) + n_ok)  # cache: everything but the newest token
        proposer.observe(len(ids) - 1, hidden[: n_ok + 1])  # positions whose inputs were all accepted
        proposer.accepted(len(ids) + n_ok)
        for t in new:
            ids.append(t)
            seq.append(t, room_left=len(ids) < limit)
            if seq.finished:
                break
    stats.tokens = len(seq.output_ids)
    return seq, stats


def generate_speculative(target, draft, tokenizer, prompts: list[list[dict]] | list[list[int]],
                         params: SamplingParams, k: int = 4, chat: bool = True) -> tuple[list, SpecStats]:
    """generate.generate's job (chat message lists or token id lists -> Completions), one prompt at
    a time (speculative decoding helps at batch 1), with summed statistics."""
    from tinylm.inference.generate import Completion, prompt_opens_think, render_chat

    total, out = SpecStats(), []
    for p in prompts:
        ids = render_chat(tokenizer, p) if chat else list(p)
        seq, st = speculative_generate(target, draft, tokenizer, ids, params, k, split_think=chat,
                                       in_think=chat and prompt_opens_think(tokenizer, ids))
        for f in ("proposed", "accepted", "target_forwards", "tokens"):
            setattr(total, f, getattr(total, f) + getattr(st, f))
        out.append(Completion(seq.content, seq.reasoning, seq.output_ids, len(ids), seq.finish_reason or "stop"))
    return out, total
