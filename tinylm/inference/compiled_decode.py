"""An opt-in compiled decode step for CPU: one fixed-shape graph per (model, batch, cache length).

Why: at batch 1 a `tiny` decode step is dominated by per-op overhead (~200 eager aten calls of a few
microseconds each, docs/performance.md section 3b); llama.cpp evaluates one prebuilt graph per token.
Here the step of tinylm.inference.fast_decode is written with static shapes only — the whole KV
buffer of `max_seq_len` positions is attended with a mask by position, the new K/V are written with
`index_copy_` at a position passed as a tensor — so torch.compile (inductor, Ansel et al. 2024,
"PyTorch 2") traces it once and never recompiles as the sequence grows. Inductor's on-disk FX-graph
cache (keyed by the graph, the config and the torch version) makes later runs skip code generation.

Opt-in (`TINYLM_COMPILE_DECODE=1`): every failure falls back to the eager fast step with one log
line. Covers fp32 models (fp32 or `--quantize int8` products, batch 1 int8 arithmetic) and 1-3 cache
rows decoding in step (chat, a few equal-length prompts): per-op overhead dominates there. From 4 rows
on the products are compute bound and the eager step is faster (bench/generate_throughput.py at 16
rows: compiled 0.61-0.63x of eager), so those steps use fast_decode unchanged.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from tinylm.inference.fast_decode import INT8_DYNAMIC_ROWS, FastDecoder, Prepared
from tinylm.models.kv_cache import StaticKVCache

log = logging.getLogger(__name__)


def enabled() -> bool:
    """True when the user opted in with TINYLM_COMPILE_DECODE=1."""
    return os.environ.get("TINYLM_COMPILE_DECODE", "0").strip().lower() in ("1", "true", "yes", "on")


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in plain ops (inductor fuses them into one loop)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _weights(prod) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(K, N) fp32 view of the split-K layout (same memory), or the (N, K) int8 weights and scales."""
    return (prod.w, prod.scale) if prod.scale is not None else (prod.w.reshape(-1, prod.w.shape[-1]), None)


def _mm(x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """x (b, K) @ W.T -> (b, N) fp32: as fast_decode.Product at batch 1 (int8: bf16 activations)."""
    if w[1] is None:
        return x @ w[0]
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w[0], w[1]).float()


class StaticStep(torch.nn.Module):
    """The decode step of fast_decode.decode_step with static shapes; weights as (K, N) fp32 buffers."""

    def __init__(self, p: Prepared) -> None:
        super().__init__()
        self.p = p
        h = p.embed.shape[1]
        self.wt = [[_weights(prod) for prod in (lw.qkv, lw.o, lw.gate_up, lw.down)] for lw in p.layers]
        self.norms = [(lw.ln1[:h], lw.ln2[:h], lw.qk_norm) for lw in p.layers]
        self.final_norm, self.head = p.norm[:h], _weights(p.lm_head)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        """tokens (b,), pos (1,) long: position of the new token in every row -> logits (b, V) fp32."""
        p = self.p
        b, nq, nk, d = tokens.shape[0], p.n_heads, p.n_kv, p.head_dim
        cos, sin = p.rope.index_select(0, pos).unbind(1)  # (1, D) each; sin with rotate_half's sign
        s = keys[0].shape[2]
        mask = (torch.arange(s) <= pos).view(1, 1, 1, s)  # attend to positions 0..pos only
        x = F.embedding(tokens, p.embed)  # (b, H)
        for (w_qkv, w_o, w_gu, w_down), (ln1, ln2, qk_norm), k_buf, v_buf in zip(self.wt, self.norms, keys, values):
            qkv = _mm(_rms(x, ln1, p.eps), w_qkv)  # (b, (nq + 2 nk) D)
            qk = qkv[:, : (nq + nk) * d].view(b, nq + nk, d)
            if qk_norm is not None:
                qk = _rms(qk, None, p.eps) * qk_norm
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            k_buf.index_copy_(2, pos, qk[:, nq:, None])  # (b, nk, 1, D) at position pos
            v_buf.index_copy_(2, pos, qkv[:, (nq + nk) * d:].view(b, nk, 1, d))
            q = qk[:, :nq].reshape(b, nk, nq // nk, d)  # GQA: g query heads of a K/V head as g rows
            y = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=mask).reshape(b, nq * d)
            x = x + _mm(y, w_o)
            gu = _mm(_rms(x, ln2, p.eps), w_gu)
            x = x + _mm(F.silu(gu[:, : p.inter]) * gu[:, p.inter:], w_down)
        return _mm(_rms(x, self.final_norm, p.eps), self.head).float()


def supports(p: Prepared) -> str | None:
    """None when the compiled step can run these prepared weights, else why not."""
    if p.embed.dtype != torch.float32:
        return "the compiled step is for fp32 models (fp32 or int8 products)"
    return None


MAX_ROWS = 4  # batches of this many rows or more decode eagerly (16 rows: compiled 0.61-0.63x of eager)
MAX_GRAPHS = 4  # compiled steps kept per model (fp32 and int8, a few shapes) before the oldest is dropped
BUCKET = 256  # cache lengths are rounded up to a multiple of this, so one compile serves many requests


def bucket(max_seq_len: int) -> int:
    """The cache length to allocate when the compiled step is on: fewer distinct shapes, fewer compiles."""
    return -(-max_seq_len // BUCKET) * BUCKET


def compile_step(step: StaticStep):
    """torch.compile with inductor's C++ wrapper (no Python per kernel launch) and frozen weights
    (constants folded, weights prepacked); fixed shapes, so no recompiles as the sequence grows."""
    return torch.compile(step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True, "freezing": True})


class CompiledDecoder:
    """Compiled StaticSteps of one model, one per (prepared weights, batch, cache length), kept on the
    model so that every generate() call reuses them. `__call__` returns None where eager must run."""

    def __init__(self, model) -> None:
        self.compiled: dict = model.__dict__.setdefault("_tinylm_compiled_decode", {})

    def __call__(self, p: Prepared, cache: StaticKVCache, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        if self.compiled.get("failed") or supports(p) is not None or tokens.shape[0] != cache.batch_size:
            return None
        if tokens.shape[0] >= MAX_ROWS:  # products are compute bound there: the eager step is faster
            return None
        if p.lm_head.scale is not None and tokens.shape[0] >= INT8_DYNAMIC_ROWS:  # eager: int8 x int8 products
            return None
        lens = cache.seq_lens.tolist()
        if rows.tolist() != list(range(cache.batch_size)) or min(lens) != max(lens) or lens[0] >= cache.max_seq_len:
            return None
        key = (p.key, cache.batch_size, cache.max_seq_len)
        try:
            fn = self.compiled.get(key)
            if fn is None:
                while len(self.compiled) >= MAX_GRAPHS:  # oldest first (weights changed, other shapes)
                    self.compiled.pop(next(iter(self.compiled)))
                log.info("compiling the decode step (batch %d, cache %d): once per shape, cached on disk by "
                         "inductor", cache.batch_size, cache.max_seq_len)
                fn = self.compiled[key] = compile_step(StaticStep(p))
            with torch.no_grad():
                logits = fn(tokens, cache.seq_lens[:1].clone(), cache.keys, cache.values)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager fast step from now on
            log.warning("compiled decode step failed (%s: %s); using the eager fast step", type(e).__name__, e)
            self.compiled["failed"] = True
            return None
        cache.seq_lens += 1
        return logits


class CompiledFastDecoder(FastDecoder):
    """fast_decode.FastDecoder whose steps run the compiled graph where it applies, eager elsewhere."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.compiled = CompiledDecoder(model)

    def step(self, p: Prepared, cache: StaticKVCache, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logits = self.compiled(p, cache, tokens, rows)
        return super().step(p, cache, tokens, rows) if logits is None else logits
