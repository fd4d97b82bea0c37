"""A lean decode step for CPU: the model's forward for one new token per row, in half the aten calls.

Why: a `small` decode step of the readable forward (model.py) is ~2000 aten calls; at batch 1 on
CPU each call costs microseconds, ~3.8 ms of a 12 ms step, and for `tiny` it is half the step
(docs/performance.md, section 3b). llama.cpp evaluates one prebuilt graph per token. This module
prepares the weights once for inference and runs the same arithmetic with fewer, cheaper ops (964
aten calls per `small` step, nested ones included, instead of 1986):

- q/k/v and gate/up weights concatenated and stored transposed, (K, N) contiguous, the layout in
  which a one-row product streams fastest (tinylm.models.linear); split along K over the torch threads
  when there are several (the same split-K layout, so the sums are added in the same order).
- residual adds folded into the products (`addmm`); RMSNorm through the fused LayerNorm kernel
  (`rms_norm` is ~6 eager ops on CPU, 2-3x slower at batch 1): LayerNorm of [x, -x] has mean 0 and
  variance mean(x^2), so its first half is x / sqrt(mean(x^2) + eps) up to rounding; QK-norm of
  all heads in one call.
- RoPE at batch 1 as one small product per layer: rotating by position p is a (D, D) matrix with
  cos on the diagonal and +-sin on the half-shifted diagonal (Su et al. 2021), built once per step
  and applied to q and k of every head together (several rows: the elementwise formula).
- GQA attention without copies: the g = n_heads / n_kv query heads of one K/V head are passed to
  SDPA as g query positions of that head (no mask needed: every cached key precedes the new token).
- optional weight-only int8 (`quantize="int8"`): per-output-channel symmetric int8 weights and
  `aten._weight_int8pack_mm` with bf16 activations (4x fewer weight bytes than fp32; the
  LLM.int8 / llama.cpp q8_0 idea of 8-bit weights with a per-block / per-row scale, Dettmers et al.
  2022), same ops otherwise; from 4 rows on, activations quantised per row and `torch._int_mm`.
- several rows (batched serving) in fp32: oneDNN's packed-weight GEMM instead of MKL's sgemm.

The reference path (model.py) stays the definition: `tests/test_fast_decode.py` checks logits and
greedy tokens against it. Used by `tinylm.inference.generate.StaticRunner` for decode steps of dense tinylm
models on CPU; set `TINYLM_FAST_DECODE=0` to use the reference forward instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinylm.models import linear as tl_linear
from tinylm.models.kv_cache import StaticKVCache

QUANTIZE_CHOICES = ("none", "int8")
INT8_DYNAMIC_ROWS = 4  # from this many rows on, int8 products quantise the activations too (see Product)


def enabled() -> bool:
    """False when the user opted out with TINYLM_FAST_DECODE=0."""
    return os.environ.get("TINYLM_FAST_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


def set_quantization(model, quantize: str | None) -> None:
    """Ask for weight-only int8 decoding ("int8") or not ("none"/None). Weights on disk are unchanged."""
    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    model.__dict__["_tinylm_decode_quantize"] = quantize


def require_quantizable(model, quantize: str) -> None:
    """set_quantization, or one clear error when this model cannot decode through the fast step."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    reason = supports(model) or (None if enabled() else "TINYLM_FAST_DECODE=0 is set")
    if quantize != "none" and reason:
        raise ValueError(f"--quantize {quantize}: not available for this model ({reason}); "
                         "int8 decoding covers dense tinylm models in fp32/bf16 on CPU")
    set_quantization(model, quantize)


def quantization(model) -> str:
    return model.__dict__.get("_tinylm_decode_quantize", "none")


def supports(model) -> str | None:
    """None when the fast step computes exactly what `model` computes, else the reason it does not."""
    from tinylm.models.linear import Linear
    from tinylm.models.model import Attention

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "tinylm":
        return "not a tinylm model"
    if cfg.num_experts:
        return "MoE layers decode through the reference forward"
    params = list(model.parameters())
    if params[0].device.type != "cpu" or any(p.dtype not in (torch.float32, torch.bfloat16) for p in params):
        return "the fast step is for fp32/bf16 models on CPU"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not Attention:
            return f"attention class {type(attn).__name__}"
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if type(lin) is not Linear or lin.bias is not None or lin._forward_hooks or lin._forward_pre_hooks:
                return "adapters, hooks or biases on a projection (LoRA/PEFT/NF4)"
    if type(model.lm_head) is not Linear or model.lm_head.bias is not None:
        return "wrapped lm_head"
    return None


# ---------------------------------------------------------------------------------------------
# Prepared weights.
# ---------------------------------------------------------------------------------------------
@dataclass
class Product:
    """One weight product y = x @ W.T in its decode form: fp32/bf16 split-K layout or int8."""

    w: torch.Tensor  # (c, K/c, N) float, or (N, K) int8
    scale: torch.Tensor | None = None  # (N,) bf16 per-output-channel scales (int8 only)
    packed: torch.Tensor | None = None  # oneDNN-blocked fp32 (N, K) for products of several rows (lazy)
    w_t: torch.Tensor | None = None  # (K, N) int8 for torch._int_mm (lazy)
    scale_f: torch.Tensor | None = None  # (N,) fp32 scales for the _int_mm path

    @classmethod
    def make(cls, owner: torch.nn.Module, name: str, weights: list[torch.Tensor], quantize: str) -> Product:
        """The product of cat(weights) (N, K); float layouts are shared with tinylm.models.linear's decode
        copies cached on `owner` under `name` (one copy in memory, same summation order)."""
        if quantize == "int8":
            wf = torch.cat(weights).detach().float()
            scale = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
            q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            return cls(q, scale.to(torch.bfloat16))
        return cls(tl_linear._cached_layout(owner, name, weights))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, K) -> x @ W.T (+ residual) (b, N)."""
        if self.scale is not None and x.shape[0] >= INT8_DYNAMIC_ROWS:
            return self._int8_rows(x, residual)
        if self.scale is not None:  # int8 weights, bf16 activations, bf16 out
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.w, self.scale)
            return y.to(x.dtype) if residual is None else residual.add(y)
        if x.shape[0] > 1 and x.dtype == torch.float32 and _ONEDNN:
            return self._rows(x, residual)
        c, kc, n = self.w.shape
        if c == 1:
            return x @ self.w[0] if residual is None else torch.addmm(residual, x, self.w[0])
        y = torch.bmm(x.view(-1, c, kc).transpose(0, 1), self.w).sum(0)  # one thread per K slice
        return y if residual is None else residual.add(y)


    def int8_rows_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, N) int8 weights and (N,) fp32 scales for products of several rows (made once)."""
        if self.w_t is None:
            self.w_t = self.w.t().contiguous()
            self.scale_f = self.scale.float()
        return self.w_t, self.scale_f

    def _int8_rows(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """Several rows with int8 weights: int8 x int8 -> int32 products (`torch._int_mm`, AVX-512-VNNI
        through oneDNN) on activations quantised per row with a symmetric scale, as llama.cpp's q8_0
        quantises activations (per block of 32 there). At 16 rows 1.7x faster than the bf16-activation
        kernel, whose cost grows with the rows; at 1 row the quantisation ops cost more than they save."""
        self.int8_rows_weights()
        xf = x.float()  # bf16 x / scale can round to 128, which int8 wraps to -128
        sx = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)  # (b, 1)
        q = torch.round(xf / sx).clamp_(-127, 127).to(torch.int8)
        y = torch._int_mm(q, self.w_t) * sx  # (b, N) fp32
        if residual is None:
            return y.mul_(self.scale_f).to(x.dtype)
        return torch.addcmul(residual, y, self.scale_f).to(residual.dtype)

    def _rows(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """Several rows (batched decoding): oneDNN's packed-weight GEMM. MKL's sgemm runs a 16-row
        product at ~30 GFLOP/s on this AMD CPU, oneDNN's AVX-512 kernel ~1.6x faster (measured,
        docs/performance.md); one row stays on the split-K path, which streams faster."""
        if self.packed is None:
            c, kc, n = self.w.shape
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w.reshape(c * kc, n).t().contiguous(), 16)
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, None, "add")


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # (2H,): the RMSNorm weight twice, for `rms_norm`
    qk_norm: torch.Tensor | None  # (n_heads + n_kv, D): q_norm weight for q heads, k_norm for k heads
    qkv: Product
    o: Product
    ln2: torch.Tensor
    gate_up: Product
    down: Product


@dataclass
class Prepared:
    """Everything the step needs, derived once from the model (rebuilt when the weights change)."""

    key: tuple
    embed: torch.Tensor  # (V, H)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (2H,) as ln1
    lm_head: Product
    rope: torch.Tensor  # (max_pos, 2, D): cos and sign-folded sin per position
    shift: torch.Tensor  # (D, D): shift[j, i] = 1 where j = (i + D/2) mod D (rotate_half as a matrix)
    n_heads: int
    n_kv: int
    head_dim: int
    inter: int
    eps: float


def _doubled(weight: torch.Tensor) -> torch.Tensor:
    return torch.cat((weight, weight)).detach()


def rms_norm(x: torch.Tensor, weight2: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, weight2 = cat(weight, weight) (or None).

    LayerNorm of [x, -x] subtracts a mean of 0 and divides by sqrt(mean(x^2) + eps): RMSNorm in
    one fused kernel (2 small ops around it), where `F.rms_norm` runs ~6 eager ops on CPU."""
    d = x.shape[-1]
    return F.layer_norm(torch.cat((x, x.neg()), dim=-1), (2 * d,), weight2, None, eps)[..., :d]


def _weights_key(model, quantize: str) -> tuple:
    cfg = model.config  # RoPE settings: `tinylm chat --yarn-factor` changes them on a loaded model
    return (tl_linear._optimizer_steps, torch.get_num_threads(), quantize, cfg.rope_theta, cfg.yarn_factor,
            cfg.max_position_embeddings, cfg.yarn_original_max_position,
            *((p.data_ptr(), p._version) for p in model.parameters()))


def _rope_table(model, max_pos: int, dtype: torch.dtype) -> torch.Tensor:
    """(max_pos, 2, D): the model's own cos/sin, with rotate_half's sign folded into sin's first half."""
    pos = torch.arange(max_pos)[None]
    cos, sin = model.model.rope(pos, dtype)  # (1, P, D) each, exactly what the forward uses
    sin = sin.clone()
    sin[..., : sin.shape[-1] // 2].neg_()
    return torch.stack((cos[0], sin[0]), dim=1).contiguous()


@torch.no_grad()
def prepare(model) -> Prepared:
    """Prepared weights for `model`, cached on it and rebuilt only when a weight may have changed
    (tensor version counters, optimizer steps, thread count: as tinylm.models.linear's decode copies)."""
    from tinylm.models.config import context_length

    quantize = quantization(model)
    key = _weights_key(model, quantize)
    cached = model.__dict__.get("_tinylm_fast_decode")
    if cached is not None and cached.key == key:
        return cached
    model.__dict__["_tinylm_fast_decode"] = None  # free the old copy before building the new one
    cfg = model.config
    layers = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qk = torch.cat((a.q_norm.weight.expand(a.n_heads, -1), a.k_norm.weight.expand(a.n_kv, -1))) if a.qk_norm else None
        layers.append(LayerWeights(
            ln1=_doubled(layer.input_layernorm.weight), qk_norm=qk,
            qkv=Product.make(a.q_proj, "_fused_decode_weight", [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight],
                             quantize),
            o=Product.make(a.o_proj, "_decode_weight", [a.o_proj.weight], quantize),
            ln2=_doubled(layer.post_attention_layernorm.weight),
            gate_up=Product.make(m.gate_proj, "_fused_decode_weight", [m.gate_proj.weight, m.up_proj.weight], quantize),
            down=Product.make(m.down_proj, "_decode_weight", [m.down_proj.weight], quantize)))
    dtype = model.model.embed_tokens.weight.dtype
    prepared = Prepared(key=key, embed=model.model.embed_tokens.weight.detach(), layers=layers,
                        norm=_doubled(model.model.norm.weight), lm_head=Product.make(model.lm_head, "_decode_weight", [model.lm_head.weight], quantize),
                        rope=_rope_table(model, context_length(cfg), dtype),
                        shift=torch.eye(cfg.head_dim, dtype=dtype).roll(cfg.head_dim // 2, dims=0), n_heads=cfg.num_attention_heads,
                        n_kv=cfg.num_key_value_heads, head_dim=cfg.head_dim, inter=cfg.intermediate_size,
                        eps=cfg.rms_norm_eps)
    model.__dict__["_tinylm_fast_decode"] = prepared
    return prepared


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------
def _attend(p: Prepared, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: StaticKVCache, i: int,
            rows: torch.Tensor | None, pos: torch.Tensor, kv_len: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Write k/v (b, n_kv, D) at `pos` of `rows` in layer i's cache; attend q (b, n_heads, D) -> (b, n_heads*D)."""
    b = q.shape[0]
    k_buf, v_buf = cache.keys[i], cache.values[i]  # (B, n_kv, S_max, D)
    if rows is None:  # every row, same length: slice writes and views (select/narrow: fewest view ops)
        k_buf.select(2, kv_len - 1).copy_(k)
        v_buf.select(2, kv_len - 1).copy_(v)
        keys, values = k_buf.narrow(2, 0, kv_len), v_buf.narrow(2, 0, kv_len)
    else:
        k_buf[rows, :, pos] = k
        v_buf[rows, :, pos] = v
        keys, values = k_buf[rows, :, :kv_len], v_buf[rows, :, :kv_len]  # gathered copies
    g = p.n_heads // p.n_kv
    # GQA: the g query heads of K/V head j (heads j*g .. j*g+g-1) act as g query positions of head j.
    y = F.scaled_dot_product_attention(q.view(b, p.n_kv, g, p.head_dim), keys, values, attn_mask=mask)
    return y.view(b, p.n_heads * p.head_dim)


def decode_step(p: Prepared, cache: StaticKVCache, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tokens (b,) for cache rows `rows` (b,) -> next-token logits (b, V) fp32; advances the rows by 1.

    Same arithmetic as `TinyLMForCausalLM(tokens[:, None], cache=cache, cache_rows=rows,
    logits_to_keep=1)` up to fp32 summation order.
    """
    b = tokens.shape[0]
    pos = cache.seq_lens[rows]  # (b,) position of the new token
    lens = pos.tolist()
    kv_len = max(lens) + 1
    if kv_len > cache.max_seq_len:
        raise ValueError(f"KV cache overflow: need {kv_len} positions, cache holds {cache.max_seq_len}")
    if kv_len > p.rope.shape[0]:
        raise ValueError(f"position {kv_len - 1} is past the prepared RoPE table ({p.rope.shape[0]})")
    same = b == cache.batch_size and min(lens) == kv_len - 1 and rows.tolist() == list(range(b))
    row_idx = None if same else rows
    mask = None if min(lens) == kv_len - 1 else (torch.arange(kv_len) <= pos[:, None])[:, None, None]  # (b,1,1,S)
    cos, sin = p.rope[pos][:, None].unbind(2)  # (b, 1, D) each; sin with rotate_half's sign
    # RoPE, Llama's half-split layout: y_i = x_i cos_i + x_{(i + D/2) mod D} sin_i. One row: as a (D, D)
    # matrix (one small product per layer); several rows: elementwise (small batched products are slow).
    rot = torch.diag_embed(cos[0]).addcmul_(p.shift, sin[0]) if b == 1 else None  # (1, D, D)
    nq, nk, d = p.n_heads, p.n_kv, p.head_dim
    x = F.embedding(tokens, p.embed)  # (b, H)
    for i, lw in enumerate(p.layers):
        qkv = lw.qkv(rms_norm(x, lw.ln1, p.eps))  # (b, (nq + 2 nk) D)
        qk = qkv[:, : (nq + nk) * d].view(b, nq + nk, d)
        if lw.qk_norm is not None:
            qk = rms_norm(qk, None, p.eps).mul(lw.qk_norm)
        if rot is not None:
            qk = torch.bmm(qk, rot)  # (1, nq + nk, D) rotated
        else:
            qk = torch.mul(qk, cos).addcmul_(qk.roll(d // 2, dims=-1), sin)
        v = qkv[:, (nq + nk) * d:].view(b, nk, d)
        y = _attend(p, qk[:, :nq], qk[:, nq:], v, cache, i, row_idx, pos, kv_len, mask)
        x = lw.o(y, residual=x)
        gu = lw.gate_up(rms_norm(x, lw.ln2, p.eps))  # (b, 2 I)
        x = lw.down(F.silu(gu[:, : p.inter]).mul_(gu[:, p.inter:]), residual=x)
    cache.seq_lens[rows] += 1
    return p.lm_head(rms_norm(x, p.norm, p.eps)).float()


class FastDecoder:
    """`decode_step` for one model, re-preparing the weights when they may have changed. The full
    check (every parameter's version) runs at `refresh()` (once per prefill); each step checks only
    the optimizer-step count and thread count, which is what changes during training rollouts."""

    def __init__(self, model) -> None:
        self.model = model
        self.prepared: Prepared | None = None

    def refresh(self) -> None:
        self.prepared = prepare(self.model)

    def __call__(self, cache: StaticKVCache, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        p = self.prepared
        if p is None or p.key[:3] != (tl_linear._optimizer_steps, torch.get_num_threads(), quantization(self.model)):
            self.refresh()
            p = self.prepared
        return self.step(p, cache, tokens, rows)

    def step(self, p: Prepared, cache: StaticKVCache, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """One step on prepared weights (tinylm.inference.compiled_decode overrides it)."""
        return decode_step(p, cache, tokens, rows)
