"""Multi-head latent attention (MLA), DeepSeek-V2 §2.1 (DeepSeek-AI 2024a) as used in DeepSeek-V3.

Why: the KV cache, not the weights, bounds decode batch size and context on small hardware. MLA
stores one low-rank latent per token instead of per-head keys and values:

    c_kv  = RMSNorm(W_DKV x)               (T, r)         the cached latent, r = kv_lora_rank
    k_R   = RoPE(W_KR x)                   (T, d_R)       one RoPE key shared by all heads (cached)
    k_h   = [W_UK,h c_kv ; k_R]            (T, d_n + d_R) per-head key:   no-RoPE part from the latent
    v_h   = W_UV,h c_kv                    (T, d_v)       per-head value: from the latent
    q_h   = [W_UQ,h c_q ; RoPE(W_QR,h c_q)]               c_q = RMSNorm(W_DQ x), or x when q_lora_rank = 0

RoPE is "decoupled" (only d_R dims carry position) because a rotation between W_UK and c_kv would
stop W_UK from being folded into the query. The cache holds r + d_R numbers per token and layer;
GQA holds 2 * n_kv * head_dim.

Inference (any cache): the up-projections are absorbed (DeepSeek-V2 §2.1.3). For head h,
    q_h . k_h = (W_UK,h^T q_nope,h) . c_kv + q_rope,h . k_R      -> attention over [c_kv ; k_R]
    o_h       = W_UV,h (sum_j a_j c_kv,j)                          -> attend to c_kv, then expand
so attention runs directly on the cached latents (one shared "KV head", SDPA broadcasts it) and
K/V are never materialised. Training (no cache) expands K/V and runs ordinary attention, which is
cheaper when every position is a query. Module and weight names follow transformers'
DeepseekV3Attention, so export is a renaming job; tests/test_mla.py checks both paths against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.models.config import TinyLMConfig
from tinylm.models.layers import RMSNorm, apply_rope
from tinylm.models.linear import Linear


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The effective (out, in) weight of a linear layer: plain, or wrapped (LoRA, NF4) by probing it
    with the identity (one (in, in) product; wrapped layers appear only when fine-tuning)."""
    if type(layer) in (nn.Linear, Linear):
        return layer.weight
    n_in = layer.in_features
    w = next(p for p in layer.parameters())
    eye = torch.eye(n_in, device=w.device, dtype=torch.float32)
    return layer(eye.to(w.dtype if w.is_floating_point() else torch.float32)).t()  # (out, in)


class MLA(nn.Module):
    """Multi-head latent attention with the same call signature as model.Attention."""

    def __init__(self, config: TinyLMConfig, layer_idx: int) -> None:
        super().__init__()

        self.layer_idx = layer_idx
        h, self.n_heads = config.hidden_size, config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.d_qk = self.d_nope + self.d_rope
        if self.q_lora_rank:
            self.q_a_proj = Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.n_heads * self.d_qk, bias=False)
        else:
            self.q_proj = Linear(h, self.n_heads * self.d_qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, self.kv_lora_rank + self.d_rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.o_proj = Linear(self.n_heads * self.d_v, h, bias=False)
        self.scale = self.d_qk ** -0.5
        self.dropout = config.attention_dropout

    def _query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> q_nope (B, n, T, d_n), q_rope (B, n, T, d_R) with RoPE applied."""

        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(b, t, self.n_heads, self.d_qk).transpose(1, 2)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        return q_nope, apply_rope(q_rope.contiguous(), cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> what the cache stores: c_kv (B, 1, T, r) and the RoPE key k_R (B, 1, T, d_R)."""

        b, t, _ = x.shape
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).view(b, 1, t, self.kv_lora_rank)
        k_rope = apply_rope(k_rope.reshape(b, 1, t, self.d_rope), cos, sin)
        return c_kv, k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: object | None) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B|1, 1, T, d_R)
        q_nope, q_rope = self._query(x, cos, sin)
        c_kv, k_rope = self.latent(x, cos, sin)
        if cache is None:
            y = self._expanded(q_nope, q_rope, c_kv, k_rope, mask)
        else:
            # One cached row per token, [c_kv ; k_R] (B, 1, S, r + d_R), in tinylm's StaticKVCache (sized
            # so in kv_cache.py) or a transformers DynamicCache; the value slot is unused (width 0).
            latent, _ = cache.update(torch.cat((c_kv, k_rope), dim=-1), c_kv[..., :0], self.layer_idx)
            y = self._absorbed(q_nope, q_rope, latent, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.d_v))

    def _expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Training path: materialise per-head K (B, n, S, d_n + d_R) and V (B, n, S, d_v)."""
        b, _, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(b, s, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(b, self.n_heads, s, self.d_rope)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        t = q.shape[2]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0)  # (B, n, T, d_v)

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Inference path on the cached rows latent = [c_kv ; k_R] (B, 1, S, r + d_R)."""
        b, n, t, _ = q_nope.shape
        s, r = latent.shape[2], self.kv_lora_rank
        w = linear_weight(self.kv_b_proj).view(n, self.d_nope + self.d_v, r)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope:]  # (n, d_n, r), (n, d_v, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk.to(q_nope.dtype))  # W_UK^T q: (B, n, T, r)
        # All heads share the one latent key/value "head": fold heads into the query axis (n*T queries
        # against S keys) so attention is two plain batched products, with no per-head copies of the cache.
        q = torch.cat((q_lat, q_rope), dim=-1).reshape(b, 1, n * t, r + self.d_rope)
        if mask is None:  # causal: query i (of T) sees keys up to S - T + i
            mask = torch.arange(s, device=q.device)[None, :] <= torch.arange(s - t, s, device=q.device)[:, None]
            mask = mask[None, None]  # (1, 1, T, S)
        mask = mask.expand(b, 1, t, s)[:, :, None].expand(b, 1, n, t, s).reshape(b, 1, n * t, s)
        scores = torch.matmul(q, latent.transpose(-1, -2)).mul_(self.scale)  # (B, 1, n*T, S)
        scores = torch.where(mask, scores, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(latent.dtype)
        o_lat = torch.matmul(probs, latent[..., :r]).view(b, n, t, r)  # attention over c_kv
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv.to(o_lat.dtype))  # W_UV o: (B, n, T, d_v)


def kv_bytes_per_token(config: TinyLMConfig, dtype_bytes: int = 2) -> int:
    """KV-cache bytes per token over all layers: (r + d_R) for MLA, 2 * n_kv * head_dim for GQA."""
    if getattr(config, "attention", "gqa") == "mla":
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim  # one [c_kv ; k_R] row
    else:
        per_layer = 2 * config.num_key_value_heads * config.head_dim
    return per_layer * config.num_hidden_layers * dtype_bytes
