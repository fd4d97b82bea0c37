"""The model's building blocks shared by attention variants (model.py, mla.py) and the MTP heads
(mtp.py): RMSNorm, rotary embeddings with YaRN, and the chunked linear + cross-entropy loss.

They live here, below model.py, so that mla.py and mtp.py can use them without importing model.py
(which imports them). model.py re-exports the names, so `from tinylm.models.model import RMSNorm` works.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.models.config import TinyLMConfig


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward: saves x and the (.., 1) inverse RMS instead of the
    full-size intermediates autograd would keep, and does ~6 elementwise passes instead of ~14
    (measured: docs/performance.md). Same arithmetic as transformers' LlamaRMSNorm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math for bf16/fp16 inputs
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        xhat = x.to(r.dtype) * r
        gf = g.to(r.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (gf * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gxhat = gf * weight.to(r.dtype)  # d loss / d xhat
            dot = (gxhat * xhat).mean(-1, keepdim=True)  # (..., 1)
            grad_x = torch.addcmul(gxhat, xhat, dot, value=-1).mul_(r).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight * (x / rms(x)), computed in fp32 and cast back (as Llama / Qwen3 do).
        if torch.is_grad_enabled():
            return _RMSNormFn.apply(x, self.weight, self.eps)
        # Inference (decode): the same math without autograd.Function's per-call overhead.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(config: TinyLMConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale; YaRN when yarn_factor > 1."""
    dim, base = config.head_dim, config.rope_theta
    if getattr(config, "attention", "gqa") == "mla":  # MLA rotates only its decoupled RoPE dims (mla.py)
        dim = config.qk_rope_head_dim
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    factor = config.yarn_factor
    if factor <= 1.0:
        return inv_freq, 1.0
    # YaRN: keep high-frequency dims (many rotations within the original context) as they are,
    # interpolate low-frequency dims by `factor`, blend linearly in between (beta_fast=32, beta_slow=1).
    orig = config.yarn_original_max_position

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(32)), 0)
    high = min(math.ceil(correction_dim(1)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, 0.1 * math.log(factor) + 1.0  # attention temperature (mscale)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), in 4 half-width passes and no
    # cat/neg temporaries. cos/sin repeat their two halves, so their first half suffices.
    # sign=-1 applies the inverse rotation (the backward pass).
    h = x.shape[-1] // 2
    x1, x2, c, s = x[..., :h], x[..., h:], cos[..., :h], sin[..., :h]
    if torch.compiler.is_compiling():  # inductor fuses the plain formula itself (and rejects out=)
        return torch.cat((x1 * c - sign * x2 * s, x2 * c + sign * x1 * s), dim=-1)
    shape = [max(a, b) for a, b in zip(x.shape, cos.shape)]  # broadcast (torch.broadcast_shapes is slow Python)
    out = torch.empty(shape, dtype=torch.result_type(x, cos), device=x.device)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)  # x1 cos - x2 sin
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)  # x2 cos + x1 sin
    return out


class _RoPEFn(torch.autograd.Function):
    """Rotary embedding (Su et al. 2021) as one op: a rotation's gradient is the inverse rotation,
    so backward is the same kernel with sin negated; nothing but cos/sin is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, -1.0).to(ctx.x_dtype), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D), cos/sin (B|1, 1, T, D) -> x rotated by position (Llama's half-split layout)."""
    if torch.is_grad_enabled():
        return _RoPEFn.apply(x, cos, sin)
    # Inference (decode): the same products in 5 ops instead of 11 (each op costs microseconds at
    # batch 1): rotate_half(x) = (-x2, x1) is a roll by half the head and a sign flip.
    rotated = x.roll(x.shape[-1] // 2, dims=-1)
    rotated[..., : x.shape[-1] // 2].neg_()
    return torch.mul(x, cos).addcmul_(rotated, sin)


class _LinearCrossEntropyFn(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) over rows, in row chunks, never holding the full (N, V) logits.

    The gradient is computed chunk by chunk during the forward pass (softmax - onehot is known
    there) and scaled by the incoming scalar gradient in backward, as in Liger-Kernel's fused
    linear cross-entropy (Hsu et al. 2024). A chunk's logits (<= ~16 MB) stay in cache and are
    reused by the allocator, where full (B, T, V) fp32 logits cost ~70 MB per tensor for `small`.
    Rows with label -100 contribute nothing.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                need_grad: bool) -> torch.Tensor:
        # h (N, H), weight (V, H), labels (N,) -> scalar loss sum (fp32)
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        grad_h = torch.zeros_like(h) if need_grad and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device) \
            if need_grad and ctx.needs_input_grad[1] else None
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], labels[start:start + chunk]
            logits = F.linear(hc, weight)  # (c, V); autocast may run the matmul in bf16
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            valid = yc != -100
            safe_y = yc.clamp(min=0)[:, None]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (c, 1)
            total += ((lse - logits.gather(1, safe_y)).squeeze(1) * valid).sum()
            if grad_h is None and grad_w is None:
                continue
            probs = logits.sub_(lse).exp_()  # softmax, in place
            probs.scatter_add_(1, safe_y, -torch.ones_like(lse))  # - onehot(y)
            probs.mul_(valid[:, None])  # ignored rows: no gradient
            if grad_h is not None:
                grad_h[start:start + chunk] = F.linear(probs.to(weight.dtype), weight.t()).to(h.dtype)  # (c, H)
            if grad_w is not None:
                grad_w += F.linear(probs.t().to(hc.dtype), hc.t())  # (V, H)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * g).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """h (N, H), weight (V, H), labels (N,) with -100 = ignore -> summed CE (fp32 scalar)."""
    chunk = max(128, (1 << 22) // weight.shape[0])  # ~16 MB of fp32 logits per chunk
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropyFn.apply(h, weight, labels, chunk, need_grad)
