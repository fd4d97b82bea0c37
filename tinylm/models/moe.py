"""Mixture of Experts feed-forward layer in the DeepSeek-V2/V3 style.

- Fine-grained routed experts plus always-on shared experts (DeepSeekMoE, Dai et al. 2024): the
  shared experts learn common knowledge so routed experts can specialise.
- Router scores: softmax over experts (DeepSeek-V2) or per-expert sigmoid (DeepSeek-V3), top-k
  selection, optional renormalisation of the selected weights, optional scaling factor.
- Balance, two ways, usable together:
  * sequence-level auxiliary loss (DeepSeek-V3 eq. 17-20): L = sum_i f_i * P_i per sequence,
    f_i = E/(k*T) * #tokens routed to i, P_i = mean normalised score of i; times a small coefficient.
  * auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy
    for Mixture-of-Experts"): a per-expert bias is added to the scores for *selection only*, and
    after each step nudged by `rate * sign(mean_load - load_i)`, so no gradient fights the LM loss.
- Dispatch sorts the (token, expert) assignments by expert and runs one matmul per expert on a
  contiguous slice: no Python loop over tokens. Expert weights are stacked 3-D tensors with the
  same layout as transformers' Dots1 / DeepSeek-V3 experts (gate_up_proj (E, 2I, H), down_proj
  (E, H, I)), which keeps export a renaming job.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.models.config import TinyLMConfig
from tinylm.models.linear import Linear, fused_decode


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_decode(x, (self.gate_proj, self.up_proj))  # one GEMV when decoding on CPU
        gate, up = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """Top-k router. `expert_bias` only changes which experts are chosen, never their weights."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.scoring = config.moe_scoring
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update / stats reset (not saved).
        self.register_buffer("load_counts", torch.zeros(config.num_experts, dtype=torch.float32), persistent=False)
        # Same counts for reporting (`TinyLMForCausalLM.moe_load_stats`), reset when read.
        self.register_buffer("stat_counts", torch.zeros(config.num_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (N, H) -> scores (N, E), topk_idx (N, k), topk_weight (N, k); routing in fp32.
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        topk_idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        topk_weight = scores.gather(-1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, topk_idx, topk_weight * self.scaling


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (N, H); topk_idx / topk_weight: (N, k). Returns output (N, H) and tokens per expert (E,).
        n, k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # assignments grouped by expert
        token_of = order // k  # source token of each sorted assignment
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        x_sorted = x[token_of]  # (N*k, H)
        out_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, c in enumerate(counts.tolist()):  # one matmul per expert, contiguous slices
            if c == 0:
                continue
            seg = x_sorted[start:start + c]
            gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)
            out_sorted[start:start + c] = F.linear(F.silu(gate) * up, self.down_proj[e])
            start += c
        weighted = out_sorted * topk_weight.reshape(-1)[order, None].to(out_sorted.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of, weighted)
        return out, counts


class MoE(nn.Module):
    """Routed + shared experts. forward returns (output, aux_loss)."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.aux_coef = config.router_aux_loss_coef
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, H); token_mask: (B, T) 1 for real tokens (padding is ignored by the aux loss/stats).
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        scores, topk_idx, topk_weight = self.gate(flat)
        out, counts = self.experts(flat, topk_idx, topk_weight)
        out = out.reshape(b, t, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        if token_mask is not None:
            counts = torch.bincount(topk_idx[token_mask.reshape(-1).bool()].reshape(-1), minlength=self.num_experts)
        self.gate.load_counts += counts.float()
        self.gate.stat_counts += counts.float()

        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_coef > 0:
            aux = self.aux_coef * self.sequence_balance_loss(scores.view(b, t, -1), topk_idx.view(b, t, -1), token_mask)
        return out, aux

    def sequence_balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        # scores (B, T, E), topk_idx (B, T, k) -> scalar; DeepSeek-V3 sequence-wise balance loss.
        b, t, e = scores.shape
        mask = torch.ones(b, t, device=scores.device) if token_mask is None else token_mask.float()
        n_tok = mask.sum(dim=1).clamp(min=1)  # (B,)
        probs = scores / scores.sum(dim=-1, keepdim=True)  # normalised affinities
        p = (probs * mask[..., None]).sum(dim=1) / n_tok[:, None]  # (B, E)
        hits = torch.zeros(b, e, device=scores.device).scatter_add_(
            1, topk_idx.reshape(b, -1), mask[..., None].expand(b, t, self.top_k).reshape(b, -1))
        f = hits * (e / (self.top_k * n_tok[:, None]))  # (B, E)
        return (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Aux-loss-free step: raise the bias of under-loaded experts, lower over-loaded ones."""
        counts = self.gate.load_counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        if counts.sum() > 0 and rate > 0:
            self.gate.expert_bias += rate * torch.sign(counts.mean() - counts)
        counts.zero_()
