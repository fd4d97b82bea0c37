"""The tinylm model: a decoder-only transformer in the Llama-3 / Qwen-3 family, read top to bottom.

    tokens -> embed -> [ x + Attn(RMSNorm(x)) ; x + MLP_or_MoE(RMSNorm(x)) ] x L -> RMSNorm -> lm_head

- Pre-norm RMSNorm (Zhang & Sennrich 2019): cheaper than LayerNorm, stable without warmup tricks.
- Rotary position embeddings (RoPE, Su et al. 2021) with configurable theta, and YaRN (Peng et al.
  2023) frequency interpolation to stretch the context at inference time.
- Grouped-query attention (GQA, Ainslie et al. 2023): fewer K/V heads shrink the KV cache.
- Optional QK-norm (RMSNorm on each head's q and k, as in Qwen3; Dehghani et al. 2023) keeps
  attention logits bounded at higher learning rates.
- SwiGLU MLP (Shazeer 2020), no biases anywhere, optional tied input/output embeddings.
- Optional DeepSeek-style MoE feed-forward (see moe.py).
- Attention is `F.scaled_dot_product_attention`, which picks flash / memory-efficient kernels on GPU.

Module names match transformers' Llama / Qwen3 / Dots1 classes, so export is a renaming job and
PEFT adapters target the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from tinylm.models.config import TinyLMConfig
from tinylm.models.hf_compat import cache_kwargs
from tinylm.models.kv_cache import StaticKVCache
from tinylm.models.layers import RMSNorm, apply_rope, linear_cross_entropy_sum, rope_frequencies
from tinylm.models.linear import Linear, fused_decode
from tinylm.models.mla import MLA
from tinylm.models.moe import Experts, MoE, Router, SwiGLU
from tinylm.models.mtp import MultiTokenPrediction, mtp_losses


@dataclass
class TinyLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output: loss = LM cross-entropy + aux_loss; aux_loss = weighted
    MoE balance loss (0 for dense); the KV cache field is `cache` (transformers >= 5.24) or
    `past_key_values` (older), see hf_compat.py. mtp_losses: per-depth multi-token-prediction CE (D,),
    training mode only (mtp.py)."""

    mtp_losses: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, config: TinyLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: object | None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = fused_decode(x, (self.q_proj, self.k_proj, self.v_proj))  # one GEMV when decoding on CPU
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B|1, 1, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, n_kv, S, D)
        # GQA: each K/V head serves n_heads // n_kv query heads (SDPA broadcasts, no K/V copies).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv != self.n_heads,
        )  # (B, heads, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TinyLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx) if config.attention == "mla" else Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: object | None, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, aux = self.mlp(h, token_mask)
        else:
            out, aux = self.mlp(h), x.new_zeros((), dtype=torch.float32)
        return x + out, aux


class TinyLMPreTrainedModel(PreTrainedModel):
    config_class = TinyLMConfig
    config: TinyLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' init functions skip tensors already loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)


class TinyLMModel(TinyLMPreTrainedModel):
    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # RoPE frequencies are derived from the config, computed lazily on the right device (not a
        # buffer: from_pretrained builds modules on the meta device, which would leave it empty).
        self._rope_cache: tuple[torch.Tensor, float] | None = None
        self.post_init()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (B|1, T) -> cos, sin (B|1, T, D), computed in fp32 then cast (as transformers does).
        if self._rope_cache is None or self._rope_cache[0].device != positions.device:
            inv_freq, scale = rope_frequencies(self.config)
            self._rope_cache = (inv_freq.to(positions.device), scale)
        inv_freq, scale = self._rope_cache
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: object | None = None,
        cache_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) -> final hidden states (B, T, H), summed aux loss."""
        b, t = input_ids.shape
        x = self.embed_tokens(input_ids)
        device = input_ids.device
        token_mask = None  # (B, T) real-token flags for MoE statistics
        if isinstance(cache, StaticKVCache):
            rows = cache_rows if cache_rows is not None else torch.arange(b, device=device)
            positions, key_valid = cache.begin(rows, t)
            if position_ids is not None:
                positions = position_ids
            mask = key_valid[:, None]  # (B, 1, T, S)
            if attention_mask is not None:  # right-padded new tokens
                token_mask = attention_mask
        else:
            if getattr(cache, "is_compileable", False):  # transformers' StaticCache & co
                raise ValueError(
                    "tinylm models decode with their own static cache (tinylm.inference.generate, `tinylm chat/serve`); "
                    "transformers' cache_implementation='static' is not supported: use the default dynamic "
                    "cache, or `tinylm export` the model to a native transformers class")
            past = cache.get_seq_length() if cache is not None else 0
            positions = position_ids if position_ids is not None else torch.arange(past, past + t, device=device)[None]
            mask = None  # pure causal: SDPA's is_causal fast path
            segments = None  # (B, T) packed-sequence ids: attention stays inside each sequence
            if position_ids is not None and past == 0 and t > 1:
                # transformers' packed-sequence convention: a position that does not follow its left
                # neighbour by 1 starts a new sequence (packed SFT rows restart at 0 per conversation).
                starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
                if bool(starts[:, 1:].any()):
                    segments = starts.cumsum(-1).expand(b, t)
            padded = attention_mask is not None and not bool(attention_mask.all())
            if padded or segments is not None:
                s = attention_mask.shape[1] if attention_mask is not None else t
                q_pos = torch.arange(past, past + t, device=device)
                causal = torch.arange(s, device=device)[None, :] <= q_pos[:, None]  # (T, S)
                mask = causal[None].expand(b, t, s)  # (B, T, S)
                if attention_mask is not None:
                    mask = mask & attention_mask[:, None, :].bool()
                if segments is not None:  # block-diagonal: (past == 0, so S == T)
                    mask = mask & (segments[:, :, None] == segments[:, None, :])
                # A padding query that sees no key would give NaN: let it see itself (its output is ignored).
                mask = mask | (torch.arange(s, device=device)[None, None, :] == q_pos[None, :, None])
                mask = mask[:, None]
                token_mask = attention_mask[:, -t:] if attention_mask is not None else None
            elif past > 0 and t > 1:
                causal = torch.arange(past + t, device=device)[None, :] <= torch.arange(past, past + t, device=device)[:, None]
                mask = causal[None, None]
        cos, sin = self.rope(positions, x.dtype)
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, layer_aux = layer(x, cos, sin, mask, cache, token_mask)
            aux = aux + layer_aux
        if isinstance(cache, StaticKVCache):
            real = attention_mask.sum(dim=1) if attention_mask is not None else torch.full((b,), t, device=device)
            cache.end(real)
        return self.norm(x), aux


class TinyLMForCausalLM(TinyLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__(config)
        self.model = TinyLMModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.mtp_depth:  # multi-token prediction modules (DeepSeek-V3), training only: mtp.py
            self.mtp = MultiTokenPrediction(config, lambda idx: DecoderLayer(config, idx))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: object | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        return_logits: bool = True,
        past_key_values: object | None = None,
        **kwargs: object,
    ) -> TinyLMOutput:
        """cache: a StaticKVCache (tinylm's decoder, rows picked by `cache_rows`) or a transformers
        Cache (`generate()`); `past_key_values` is its pre-5.24 transformers name.
        return_logits=False with labels: the loss is computed by a chunked fused lm_head +
        cross-entropy (much less memory and time in training; see docs/performance.md) and
        `.logits` is None. The default keeps transformers' semantics."""
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None and labels is None:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=self.config)
        hidden, aux = self.model(input_ids, attention_mask, position_ids, cache, cache_rows)
        pkv = cache if use_cache or cache is not None else None
        mtp = None
        if labels is not None and self.training and self.config.mtp_depth:
            mtp, mtp_aux = mtp_losses(self, input_ids, hidden, labels)
            aux = aux + mtp_aux + self.config.mtp_weight * mtp.mean()  # reported in aux_loss with the MoE terms
            mtp = mtp.detach()
        if labels is not None and not return_logits:
            # Shifted next-token CE without (B, T, V) logits: position t predicts token t+1.
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
            targets = labels[:, 1:].reshape(-1).to(h.device)
            ce_sum = linear_cross_entropy_sum(h, self.lm_head.weight, targets)
            denom = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1)
            return TinyLMOutput(loss=ce_sum / denom + aux, aux_loss=aux, logits=None, mtp_losses=mtp, **cache_kwargs(pkv))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()  # (B, T, V)

        loss = None
        if labels is not None:
            # Shifted next-token cross-entropy; -100 marks tokens without a target.
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            else:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum") / num_items_in_batch
            loss = loss + aux
        return TinyLMOutput(loss=loss, aux_loss=aux, logits=logits, mtp_losses=mtp, **cache_kwargs(pkv))

    # -- MoE helpers ----------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if layer.is_moe]

    @torch.no_grad()
    def moe_load_stats(self, reset: bool = True) -> dict[str, list[float]]:
        """Fraction of routed tokens per expert, per MoE layer, since the last reset."""
        stats = {}
        for i, moe in self.moe_layers():
            counts = moe.gate.stat_counts
            stats[f"layer_{i}"] = (counts / counts.sum().clamp(min=1)).tolist()
            if reset:
                counts.zero_()
        return stats

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step (call after each optimizer step)."""
        for _, moe in self.moe_layers():
            moe.update_bias(self.config.moe_bias_update_rate)
