"""Multi-token prediction (MTP), DeepSeek-V3 §2.2 (DeepSeek-AI 2024b; after Gloeckle et al. 2024).

Why: besides the next token, each position also learns to predict the 2nd, ..., (D+1)-th next
token. This densifies the training signal, and at inference the extra heads can draft tokens for
speculative decoding. Unlike Gloeckle et al.'s parallel heads, DeepSeek-V3 chains D *sequential*
modules so each prediction keeps the causal chain:

    h^0_i = the main model's final hidden state at position i (after its final RMSNorm here)
    h'^k_i = M_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k}))]        M_k: (2H -> H) projection
    h^k    = TRM_k(h'^k)                                               one transformer block
    P^k_{i+k+1} = OutHead(RMSNorm(h^k_i))                              shared embedding and head
    L_MTP = lambda / D * sum_k CE(P^k, t_{i+k+1})                      lambda = config.mtp_weight

The embedding and output head are shared with the main model; each module has its own norms,
projection, block and output norm. The MTP loss is added only in training mode (`model.train()`),
so validation loss is the main head's alone, comparable with a model without MTP. MTP blocks use
plain causal attention (packed rows are not split into documents there). The modules are not
exported (transformers' DeepseekV3 drops them too).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tinylm.models.config import TinyLMConfig
from tinylm.models.layers import RMSNorm, linear_cross_entropy_sum
from tinylm.models.linear import Linear


class MTPModule(nn.Module):
    """Depth k: combine h^{k-1} with the embedding of the token k ahead, run one block."""

    def __init__(self, config: TinyLMConfig, depth: int, block: nn.Module) -> None:
        super().__init__()
        h = config.hidden_size
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h, bias=False)
        self.block = block  # a DecoderLayer (model.py) with its own layer index after the main stack
        self.norm = RMSNorm(h, config.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h_prev, emb (B, T, H) -> h^k (B, T, H) (before the output norm), MoE aux loss."""
        x = self.eh_proj(torch.cat((self.hnorm(h_prev), self.enorm(emb)), dim=-1))
        return self.block(x, cos, sin, mask, cache, None)


class MultiTokenPrediction(nn.Module):
    def __init__(self, config: TinyLMConfig, make_block: Callable[[int], nn.Module]) -> None:
        """make_block(layer_idx) -> a decoder block; depth k gets index num_hidden_layers + k - 1, its
        own slot in a KV cache that has room for it (passed in: model.py imports this file)."""
        super().__init__()
        self.layers = nn.ModuleList(MTPModule(config, k, make_block(config.num_hidden_layers + k - 1))
                                    for k in range(1, config.mtp_depth + 1))


def mtp_losses(model, input_ids: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-depth mean CE (D,) and the summed MoE aux of the MTP blocks.

    input_ids, labels (B, T) (labels unshifted, -100 = no target); hidden (B, T, H) = h^0.
    Depth k runs on positions 0..T-k-1 and position i predicts labels[:, i + k + 1].
    """
    b, t = input_ids.shape
    h, embed = hidden, model.model.embed_tokens
    losses, aux = [], hidden.new_zeros((), dtype=torch.float32)
    for k, module in enumerate(model.mtp.layers, start=1):
        n = t - k  # positions with an input token t_{i+k}
        if n < 2:
            losses.append(hidden.new_zeros((), dtype=torch.float32))
            continue
        cos, sin = model.model.rope(torch.arange(n, device=input_ids.device)[None], hidden.dtype)
        h, layer_aux = module(h[:, :n], embed(input_ids[:, k:k + n]), cos, sin)
        aux = aux + layer_aux
        targets = labels[:, k + 1:].reshape(-1).to(h.device)  # (B * (n-1),)
        out = module.norm(h[:, : n - 1]).reshape(-1, h.shape[-1])
        count = (targets != -100).sum().clamp(min=1)
        losses.append(linear_cross_entropy_sum(out, model.lm_head.weight, targets) / count)
    return torch.stack(losses), aux
