"""Speculative decoding inside the batching engine (`tinylm serve MODEL --draft DIR|mtp`).

Why: tinylm/inference/speculative.py shows the idea at batch 1; a server decodes many rows at once.
Here every engine step, for all running rows together:

1. the proposer drafts up to k tokens per row (a separate draft model, batched over the rows with
   its own multi-row static cache; or the target's first MTP module, DeepSeek-V3 §5.4.3, k = 1);
2. ONE batched target forward scores [last token, drafts..] of every row (T = 1 + the longest
   proposal; shorter rows are padded with their last token, whose cache entries are rolled back);
3. each row keeps its tokens by speculative.verify (Leviathan et al. 2023; Chen et al. 2023) on
   speculative.distribution (so greedy rows get exactly the tokens of plain greedy decoding, and
   sampled rows follow the target's distribution), then its cache length is rolled back on its
   own: `cache.seq_lens[row] = tokens accepted` (the buffers are written in place; nothing moves).

Admission and prefill stay BatchGenerator's (generate.py); only its one-token `_decode` is replaced.
Rows that cannot speculate (repetition / frequency / presence penalties) propose 0 tokens and are
sampled from their first verification position exactly as without a draft. A row near its
`max_new_tokens` or the end of the context proposes fewer tokens. The target cache has k+1 spare
slots per row (`cache_slack`) so a padded verification never runs past it. Verification runs the
reference forward (model.py): tinylm.inference.fast_decode handles one token per row, so
`--quantize int8` is refused together with a draft. Up to k+1 tokens stream per step, so a client
that disconnects may get k+1 tokens after cancel() (Engine.cancel_lag), not 1.
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch

from tinylm.inference.generate import BatchGenerator, Sequence, context_length, sample_token
from tinylm.inference.speculative import SpecStats, check_pair, distribution, verify
from tinylm.models.kv_cache import StaticKVCache

log = logging.getLogger("tinylm.inference.spec_engine")
LOG_EVERY = 500  # verification forwards between two log lines of the acceptance statistics


def padded(token_lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token lists -> ids (b, T) right-padded, lengths (b,), attention mask (b, T) (None when all equal)."""
    lens = torch.tensor([len(t) for t in token_lists], device=device)
    ids = torch.zeros(len(token_lists), int(lens.max()), dtype=torch.long, device=device)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.tensor(t)
    if bool((lens == lens[0]).all()):
        return ids, lens, None
    return ids, lens, (torch.arange(ids.shape[1], device=device)[None] < lens[:, None]).long()


def fresh_first(rows: list[int], fresh: list[bool]) -> list[list[int]]:
    """Indices grouped for cached forwards: each fresh row alone (a whole prompt at positions 0..),
    the others together (a few tokens each). Mixing both could ask a long prompt's worth of slots
    past the longest running row and overflow the cache."""
    rest = [i for i in range(len(rows)) if not fresh[i]]
    return [[i] for i in range(len(rows)) if fresh[i]] + ([rest] if rest else [])


class BatchDraftProposer:
    """Drafts from a separate small tinylm model (same tokenizer) with one cache row per engine row."""

    max_k: int | None = None

    def __init__(self, draft, max_batch: int, max_len: int) -> None:
        param = next(draft.parameters())
        self.model, self.device = draft, param.device
        self.cache = StaticKVCache(draft.config, max_batch, max_len, device=param.device, dtype=param.dtype)
        self.n = [0] * max_batch  # tokens of each row in the draft cache
        self.owner: list[Sequence | None] = [None] * max_batch

    def _feed(self, rows: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Append tokens to rows; return the next-token logits after each row's last token (b, V)."""
        ids, lens, mask = padded(tokens, self.device)
        hidden, _ = self.model.model(ids, mask, None, self.cache, torch.tensor(rows, device=self.device))
        for r, t in zip(rows, tokens):
            self.n[r] += len(t)
        return self.model.lm_head(hidden[torch.arange(len(rows)), lens - 1]).float().cpu()

    def propose(self, seqs: list[Sequence], steps: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        """Per sequence: steps[i] drafted tokens and the distributions q (steps[i], V) they came from."""
        fresh = []
        for s in seqs:
            fresh.append(self.owner[s.row] is not s)
            if fresh[-1]:  # a new request in this row
                self.owner[s.row], self.n[s.row] = s, 0
                self.cache.reset([s.row])
        logits: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        for group in fresh_first([s.row for s in seqs], fresh):  # catch up on the tokens accepted since
            out = self._feed([seqs[i].row for i in group], [(seqs[i].prompt_ids + seqs[i].output_ids)[self.n[seqs[i].row]:]
                                                             for i in group])
            for j, i in enumerate(group):
                logits[i] = out[j]
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for d in range(max(steps)):
            for i, s in enumerate(seqs):
                if steps[i] > d:
                    qs[i].append(distribution(logits[i], s.params))
                    drafts[i].append(int(torch.multinomial(qs[i][-1], 1, generator=s.generator)))
            more = [i for i in range(len(seqs)) if steps[i] > d + 1]  # rows that draft one more token
            if more:
                out = self._feed([seqs[i].row for i in more], [drafts[i][-1:] for i in more])
                for j, i in enumerate(more):
                    logits[i] = out[j]
        return [(dr, torch.stack(q) if q else torch.empty(0)) for dr, q in zip(drafts, qs)]

    def observe(self, row: int, start: int, hidden: torch.Tensor) -> None:
        """The target's hidden states (unused by a separate draft)."""

    def accepted(self, row: int, n_valid: int) -> None:
        """Only the first n_valid tokens of the row are right: forget cached drafts beyond."""
        self.n[row] = min(self.n[row], n_valid)
        self.cache.seq_lens[row] = self.n[row]


class BatchMTPProposer:
    """Self-speculation with the target's first MTP module (DeepSeek-V3 §5.4.3): one token per row.

    Module position i needs the target's final hidden state h_i and the token t_{i+1}; its block
    keeps a cache of those positions, one row per engine row. The prompt's hidden states come from
    BatchGenerator's own prefill: a forward hook on the target's decoder keeps them while
    `capturing` is set (any prefill path of the engine is then covered, without a second prompt
    forward). Only accepted positions enter the module cache, so it never rolls back.
    """

    max_k = 1

    def __init__(self, target, max_batch: int, max_len: int, target_cache: StaticKVCache) -> None:
        if not getattr(target, "mtp", None):
            raise ValueError("--draft mtp: the model has no MTP modules (train it with mtp_depth >= 1)")
        cfg = copy.copy(target.config)
        cfg.num_hidden_layers = target.config.num_hidden_layers + 1  # the module's block is layer L
        param = next(target.parameters())
        self.cache = StaticKVCache(cfg, max_batch, max_len, device=param.device, dtype=param.dtype)
        for i in range(target.config.num_hidden_layers):  # slots of the main layers: not needed here
            self.cache.keys[i] = self.cache.values[i] = torch.empty(0)
        self.target, self.module, self.device = target, target.mtp.layers[0], param.device
        self.n = [0] * max_batch  # positions fed to the module, per row
        self.hidden: list[dict[int, torch.Tensor]] = [{} for _ in range(max_batch)]  # positions not yet fed
        self.owner: list[Sequence | None] = [None] * max_batch
        self.prompt_hidden: dict[int, torch.Tensor] = {}  # row -> (P, H) from the last prefill of that row
        self.capturing, self.target_cache = True, target_cache  # prefills into this cache are kept
        self._signature = inspect.signature(target.model.forward)
        target.model.register_forward_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs, output) -> None:
        if not self.capturing:
            return
        a = self._signature.bind(*args, **kwargs).arguments
        hidden, mask, rows = output[0], a.get("attention_mask"), a.get("cache_rows")
        if rows is None or a.get("cache") is not self.target_cache:  # not a prefill of this engine
            return
        lens = mask.sum(1).tolist() if mask is not None else [hidden.shape[1]] * hidden.shape[0]
        for i, (r, n) in enumerate(zip(rows.tolist(), lens)):
            self.prompt_hidden[r] = hidden[i, :n].clone()

    def observe(self, row: int, start: int, hidden: torch.Tensor) -> None:
        for j in range(hidden.shape[0]):
            self.hidden[row][start + j] = hidden[j]

    def accepted(self, row: int, n_valid: int) -> None:
        for pos in [p for p in self.hidden[row] if p >= n_valid]:
            del self.hidden[row][pos]

    def _run(self, rows: list[int], h: list[torch.Tensor], tokens: list[list[int]]) -> torch.Tensor:
        """Module over each row's new positions (h (c, H), tokens t_{i+1} (c,)); logits of the last (b, V)."""
        ids, lens, _ = padded(tokens, self.device)
        hs = torch.zeros(len(rows), ids.shape[1], h[0].shape[-1], dtype=h[0].dtype, device=self.device)
        for i, x in enumerate(h):
            hs[i, : x.shape[0]] = x
        rows_t = torch.tensor(rows, device=self.device)
        pos, key_valid = self.cache.begin(rows_t, ids.shape[1])  # right padding: real queries never see pads
        cos, sin = self.target.model.rope(pos, hs.dtype)
        out, _ = self.module(hs, self.target.model.embed_tokens(ids), cos, sin, key_valid[:, None], self.cache)
        self.cache.end(lens)
        last = out[torch.arange(len(rows)), lens - 1]
        return self.target.lm_head(self.module.norm(last)).float().cpu()

    def propose(self, seqs: list[Sequence], steps: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        fresh = []
        for s in seqs:
            fresh.append(self.owner[s.row] is not s)
            if fresh[-1]:
                self.owner[s.row], self.n[s.row], self.hidden[s.row] = s, 0, {}
                self.cache.reset([s.row])
                self.observe(s.row, 0, self.prompt_hidden.pop(s.row))
        out: list[tuple[list[int], torch.Tensor]] = [([], torch.empty(0))] * len(seqs)
        for group in fresh_first([s.row for s in seqs], fresh):
            rows, h, toks = [], [], []
            for i in group:
                s, r = seqs[i], seqs[i].row
                ids = s.prompt_ids + s.output_ids
                rows.append(r)
                h.append(torch.stack([self.hidden[r].pop(p) for p in range(self.n[r], len(ids) - 1)]))
                toks.append(ids[self.n[r] + 1:])
                self.n[r] = len(ids) - 1
            logits = self._run(rows, h, toks)
            for j, i in enumerate(group):
                q = distribution(logits[j], seqs[i].params)
                out[i] = ([int(torch.multinomial(q, 1, generator=seqs[i].generator))], q[None])
        return out


class SpecBatchGenerator(BatchGenerator):
    """BatchGenerator whose decode step is a batched speculative step (module docstring).

    Args:
        draft: a tinylm model with the target's tokenizer, or "mtp" (the target's first MTP module).
        k: tokens drafted per row and step (1 with "mtp").
    Statistics: `stats` (speculative.SpecStats over the rows that drafted: per-row forwards) and
    `verify_forwards` (batched target forwards) / `decode_tokens` (tokens they produced).
    """

    def __init__(self, model, tokenizer, draft, k: int = 4, max_batch: int = 8,
                 max_seq_len: int | None = None) -> None:
        if k < 1:
            raise ValueError(f"speculative k must be >= 1, got {k}")
        from tinylm.inference.fast_decode import quantization

        if quantization(model) != "none":
            raise ValueError("--quantize int8 cannot be combined with --draft (speculative verification runs "
                             "the reference forward)")
        if draft != "mtp":
            check_pair(model, draft)
            max_seq_len = min(max_seq_len or context_length(model), context_length(draft))
        self.k = 1 if draft == "mtp" else k
        super().__init__(model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, cache_slack=self.k + 1)
        slots = self.max_seq_len + self.k + 1
        self.proposer = BatchMTPProposer(model, max_batch, slots, self.runner.cache) if draft == "mtp" \
            else BatchDraftProposer(draft, max_batch, slots)
        self.draft_name = "mtp" if draft == "mtp" else getattr(draft.config, "_name_or_path", "") or "draft"
        self.stats, self.verify_forwards, self.decode_tokens = SpecStats(), 0, 0

    def _steps(self, s: Sequence) -> int:
        """Tokens row s may draft: none with penalties; never past max_new_tokens or the context."""
        if s.params.penalised:
            return 0
        n = len(s.prompt_ids) + len(s.output_ids)
        return max(0, min(self.k, s.params.max_new_tokens - len(s.output_ids) - 1, self.max_seq_len - n))

    def _decode(self, batch: list[Sequence]) -> None:
        steps = [self._steps(s) for s in batch]
        spec = [i for i, st in enumerate(steps) if st > 0]
        proposals: list[tuple[list[int], torch.Tensor]] = [([], torch.empty(0))] * len(batch)
        if spec:
            for i, p in zip(spec, self.proposer.propose([batch[i] for i in spec], [steps[i] for i in spec])):
                proposals[i] = p
        # One target forward over [last token, drafts..] of every row, padded to the longest.
        feed = [[s.output_ids[-1]] + proposals[i][0] for i, s in enumerate(batch)]
        width = max(len(f) for f in feed)
        feed = [f + [f[-1]] * (width - len(f)) for f in feed]
        rows = [s.row for s in batch]
        cache, device = self.runner.cache, self.runner.device
        old_lens = [len(s.prompt_ids) + len(s.output_ids) for s in batch]
        self.proposer.capturing = False  # not a prefill
        try:
            hidden, _ = self.model.model(torch.tensor(feed, device=device), None, None, cache,
                                         torch.tensor(rows, device=device))
        finally:
            self.proposer.capturing = True
        logits = self.model.lm_head(hidden).float().cpu()  # (b, T, V)
        self.verify_forwards += 1
        for i, s in enumerate(batch):
            drafts, q = proposals[i]
            if drafts:
                new = verify(drafts, q, distribution(logits[i, : len(drafts) + 1], s.params), s.generator)
            else:  # no draft: plain sampling, penalties included
                new = [sample_token(logits[i, 0], s.params, s.generator, s.seen, s.counts)]
            n_ok = len(new) - 1
            cache.seq_lens[s.row] = old_lens[i] + n_ok  # roll back: everything but the newest token
            if drafts:
                self.proposer.observe(s.row, old_lens[i] - 1, hidden[i, : n_ok + 1])
                self.proposer.accepted(s.row, old_lens[i] + n_ok)
                self.stats.proposed += len(drafts)
                self.stats.accepted += n_ok
                self.stats.target_forwards += 1
            emitted = self._append(s, new)
            self.decode_tokens += emitted
            self.stats.tokens += emitted if drafts else 0
        if self.verify_forwards % LOG_EVERY == 0:
            log.info("speculative (%s, k=%d): acceptance %.2f, %.2f tokens per row-forward, %.2f tokens per batched "
                     "forward", self.draft_name, self.k, self.stats.acceptance_rate, self.stats.tokens_per_forward,
                     self.decode_tokens / self.verify_forwards)

    def _append(self, s: Sequence, tokens: list[int]) -> int:
        """Stream tokens into s until it finishes (its row is then freed); returns how many were taken."""
        for n, tok in enumerate(tokens, start=1):
            s.append(tok, room_left=len(s.prompt_ids) + len(s.output_ids) < self.max_seq_len)
            if s.finished:
                self._release(s)
                return n
        return len(tokens)

    def spec_stats(self) -> dict:
        """Counters for /health and logs."""
        st = self.stats
        return {"draft": self.draft_name, "k": self.k, "proposed": st.proposed, "accepted": st.accepted,
                "acceptance_rate": round(st.acceptance_rate, 4), "row_forwards": st.target_forwards,
                "tokens_per_row_forward": round(st.tokens_per_forward, 4), "verify_forwards": self.verify_forwards,
                "tokens_per_verify_forward": round(self.decode_tokens / max(self.verify_forwards, 1), 4)}
