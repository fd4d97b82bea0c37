"""Model configuration and named presets.

`TinyLMConfig` is a `transformers.PretrainedConfig`, so a model directory holds a plain
`config.json` that `AutoConfig` reads after `import tinylm`. Field names follow Llama / Qwen3 /
DeepSeek-V3 in transformers wherever the meaning is the same, which keeps export a renaming job.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class TinyLMConfig(PretrainedConfig):
    """Decoder-only transformer in the Llama-3 / Qwen-3 family, optionally with DeepSeek-style MoE.

    Dense fields:
        vocab_size, hidden_size, intermediate_size (SwiGLU width), num_hidden_layers,
        num_attention_heads, num_key_value_heads (GQA, must divide num_attention_heads),
        head_dim (default hidden_size // num_attention_heads), max_position_embeddings,
        rms_norm_eps, rope_theta, yarn_factor (YaRN context extension when > 1: positions up to
        yarn_factor * yarn_original_max_position work at inference), qk_norm (RMSNorm on per-head q and k, Qwen3),
        tie_word_embeddings, initializer_range.

    MoE fields (num_experts == 0 means dense):
        num_experts (routed experts), num_experts_per_tok (top-k), num_shared_experts (always-on
        experts of width moe_intermediate_size each), moe_intermediate_size, first_k_dense_replace
        (the first k layers stay dense, as in DeepSeek-V3), moe_scoring ("sigmoid" as in
        DeepSeek-V3 or "softmax" as in DeepSeek-V2), norm_topk_prob, routed_scaling_factor,
        router_aux_loss_coef (sequence-level balance loss; 0 disables it), moe_bias_update_rate
        (aux-loss-free balancing: per-expert selection bias nudged toward uniform load; 0 disables).

    Attention (`attention`: "gqa" (default) or "mla", multi-head latent attention, DeepSeek-V2/V3; see
    mla.py): kv_lora_rank (cached latent width r), q_lora_rank (0 = no query compression),
    qk_nope_head_dim, qk_rope_head_dim (decoupled RoPE dims, shared key), v_head_dim. MLA ignores
    num_key_value_heads, head_dim and qk_norm (it normalises its latents instead).

    Multi-token prediction (DeepSeek-V3 §2.2; see mtp.py): mtp_depth (D sequential modules, 0 = off),
    mtp_weight (lambda: loss = main CE + lambda * mean over depths of the depth-k CE).
    """

    model_type = "tinylm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 6400,
        hidden_size: int = 512,
        intermediate_size: int = 1664,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1_000_000.0,
        yarn_factor: float = 1.0,
        yarn_original_max_position: int | None = None,
        qk_norm: bool = True,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        hidden_act: str = "silu",
        attention_dropout: float = 0.0,
        num_experts: int = 0,
        num_experts_per_tok: int = 2,
        num_shared_experts: int = 1,
        moe_intermediate_size: int | None = None,
        first_k_dense_replace: int = 0,
        moe_scoring: str = "sigmoid",
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        router_aux_loss_coef: float = 0.001,
        moe_bias_update_rate: float = 0.001,
        attention: str = "gqa",
        kv_lora_rank: int = 128,
        q_lora_rank: int = 0,
        qk_nope_head_dim: int = 64,
        qk_rope_head_dim: int = 32,
        v_head_dim: int = 64,
        mtp_depth: int = 0,
        mtp_weight: float = 0.3,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = 0,
        pad_token_id: int | None = 0,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else (
            hidden_size // num_attention_heads if num_attention_heads else 0)
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.yarn_factor = float(yarn_factor)
        self.yarn_original_max_position = yarn_original_max_position or max_position_embeddings
        self.qk_norm = qk_norm
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.attention_dropout = attention_dropout
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.moe_intermediate_size = moe_intermediate_size if moe_intermediate_size is not None else intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_scoring = moe_scoring
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.router_aux_loss_coef = router_aux_loss_coef
        self.moe_bias_update_rate = moe_bias_update_rate
        self.attention = attention
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.mtp_depth = mtp_depth
        self.mtp_weight = mtp_weight
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    # -- checks -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field for any inconsistent value."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid TinyLMConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        for name in ("rms_norm_eps", "initializer_range"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, f"{name} must be > 0, got {v!r}")
        need(0.0 <= self.attention_dropout < 1.0, f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        need(isinstance(self.head_dim, int) and self.head_dim > 0, f"head_dim must be a positive integer, got {self.head_dim!r}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"num_attention_heads={self.num_attention_heads} does not divide hidden_size={self.hidden_size}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_key_value_heads={self.num_key_value_heads} must divide "
             f"num_attention_heads={self.num_attention_heads}")
        need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.yarn_factor >= 1.0, f"yarn_factor must be >= 1, got {self.yarn_factor}")
        need(self.attention in ("gqa", "mla"), f"attention {self.attention!r} not in gqa|mla")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                v = getattr(self, name)
                need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
            need(isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 0,
                 f"q_lora_rank must be an integer >= 0 (0 = no query compression), got {self.q_lora_rank!r}")
            need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
        need(isinstance(self.mtp_depth, int) and self.mtp_depth >= 0, f"mtp_depth must be an integer >= 0, got {self.mtp_depth!r}")
        need(self.mtp_weight >= 0, f"mtp_weight must be >= 0, got {self.mtp_weight}")
        if self.num_experts:
            need(self.num_experts > 0, "num_experts must be >= 0")
            need(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
            need(self.num_shared_experts >= 0, "num_shared_experts must be >= 0")
            need(self.moe_scoring in ("sigmoid", "softmax"), f"moe_scoring {self.moe_scoring!r} not in sigmoid|softmax")
            need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                 "first_k_dense_replace must be in 0..num_hidden_layers")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.num_experts > 0 and layer_idx >= self.first_k_dense_replace


def context_length(config: Any) -> int:
    """Positions a model can use at inference: `yarn_factor * yarn_original_max_position` with YaRN.

    One definition for generate / engine / server / chat. tinylm keeps `max_position_embeddings`
    as the trained length when YaRN is switched on at inference (`--yarn-factor`), while
    transformers configs (and tinylm models imported from them) already store the extended
    length there; taking the larger of the two is right for both. Works for any HF config.
    """
    n = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
    factor = float(getattr(config, "yarn_factor", 1.0) or 1.0)
    if factor > 1.0:
        n = max(n, int(factor * (getattr(config, "yarn_original_max_position", None) or n)))
    return n


# Presets: named shapes. `small` is MiniMind's 512-wide model, so speed comparisons are like for like.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    "small": dict(hidden_size=512, intermediate_size=1664, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=2048),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=2048),
    "tiny-moe": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024, num_experts=4,
                     num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=128),
    "small-moe": dict(hidden_size=512, intermediate_size=1664, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, max_position_embeddings=2048, num_experts=8,
                      num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=640,
                      first_k_dense_replace=1),
    # Multi-head latent attention (mla.py): the cache holds kv_lora_rank + qk_rope_head_dim numbers per
    # token and layer (tiny-mla 80 vs tiny 256; small-mla 160 vs small 512).
    "tiny-mla": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=1024, attention="mla", kv_lora_rank=64,
                     q_lora_rank=0, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=64, qk_norm=False),
    "small-mla": dict(hidden_size=512, intermediate_size=1664, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, max_position_embeddings=2048, attention="mla", kv_lora_rank=128,
                      q_lora_rank=0, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, qk_norm=False),
}


def preset_config(name: str, **overrides: Any) -> TinyLMConfig:
    """Config for a named preset; unknown names raise a ValueError listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return TinyLMConfig(**{**PRESETS[name], **overrides})


def count_parameters(config: TinyLMConfig) -> tuple[int, int]:
    """(total, active-per-token) parameter counts computed from the shape alone."""
    h, v, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    hd, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    attn = h * hd * nh * 2 + h * hd * nkv * 2 + (2 * hd if config.qk_norm else 0)
    if config.attention == "mla":
        dqk, r, qr = config.qk_nope_head_dim + config.qk_rope_head_dim, config.kv_lora_rank, config.q_lora_rank
        q = (h * qr + qr + qr * nh * dqk) if qr else h * nh * dqk
        attn = q + h * (r + config.qk_rope_head_dim) + r + r * nh * (config.qk_nope_head_dim + config.v_head_dim) \
            + nh * config.v_head_dim * h
    norms = 2 * h
    dense_mlp = 3 * h * config.intermediate_size
    expert = 3 * h * config.moe_intermediate_size
    total = active = 0
    for i in range(L):
        total += attn + norms
        active += attn + norms
        if config.is_moe_layer(i):
            router = config.num_experts * h
            total += router + expert * (config.num_experts + config.num_shared_experts)
            active += router + expert * (config.num_experts_per_tok + config.num_shared_experts)
        else:
            total += dense_mlp
            active += dense_mlp
    emb = v * h * (1 if config.tie_word_embeddings else 2) + h
    return total + emb, active + emb


def describe_presets() -> str:
    """A table of presets with parameter counts, for `tinylm init --list` and docs."""
    rows = ["preset      layers  hidden  heads/kv  experts   total    active"]
    for name in PRESETS:
        c = preset_config(name)
        total, active = count_parameters(c)
        experts = f"{c.num_experts}+{c.num_shared_experts}s/k{c.num_experts_per_tok}" if c.is_moe else "-"
        rows.append(f"{name:<11} {c.num_hidden_layers:>6}  {c.hidden_size:>6}  {c.num_attention_heads:>4}/{c.num_key_value_heads:<3}"
                    f"  {experts:<8} {total / 1e6:>6.1f}M  {active / 1e6:>6.1f}M")
    return "\n".join(rows)
