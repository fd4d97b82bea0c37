"""Interop with the wider ecosystem: `tinylm init`, `tinylm info`, `tinylm export`, `tinylm import`.

Why: a model you trained should outlive this toolkit. `export` writes a directory that *plain*
transformers loads with a native architecture class (no `trust_remote_code`, tinylm not installed),
so vLLM, llama.cpp (`convert_hf_to_gguf.py`), PEFT, TRL... all work on it. Because tinylm's module
names already follow Llama / Qwen3 / Dots1, export is mostly renaming; the point of this module is
to choose a target class whose forward pass is *exactly* ours, and to refuse (with the reason)
when none is. Every mapping here is checked logit-for-logit in tests/test_interop.py.

    tinylm config                                  transformers class
    dense, no QK-norm                          ->  LlamaForCausalLM
    dense, QK-norm                             ->  Qwen3ForCausalLM
    MoE sigmoid router, QK-norm                ->  Dots1ForCausalLM     (DeepSeek-V3 style MoE)
    MoE sigmoid router, no QK-norm             ->  Glm4MoeForCausalLM   (partial_rotary_factor=1)
    MoE softmax router, QK-norm, no shared     ->  Qwen3MoeForCausalLM
    MoE softmax router, no QK-norm             ->  Qwen2MoeForCausalLM  (shared-expert gate fixed to 1)
    MLA attention, dense or sigmoid MoE        ->  DeepseekV3ForCausalLM (rope_interleave=False; dense
                                                   models use first_k_dense_replace=num_layers)

MTP modules (mtp_depth > 0) are training-time only and are not exported (transformers' DeepseekV3
drops them too); import from DeepseekV3 accepts rope_interleave=True by permuting the RoPE rows.

YaRN (`yarn_factor > 1`) maps to `rope_parameters={"rope_type": "yarn", ...}` in every target.
MoE experts are written one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, the layout of
the original checkpoints), which transformers 5 fuses on load and older tools read directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
ARCHES = ("llama", "qwen3", "dots1", "glm4_moe", "qwen3_moe", "qwen2_moe", "deepseek_v3")
HF_CLASS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "dots1": "Dots1ForCausalLM",
            "glm4_moe": "Glm4MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM"}


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _read_config_json(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON (line {e.lineno}: {e.msg})") from None


def _copy_tokenizer(src: Path, dst: Path, portable: bool = False) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if portable and (dst / "tokenizer_config.json").exists():
        from tinylm.text.tokenizer import make_tokenizer_config_portable

        make_tokenizer_config_portable(dst)
        copied = [n for n in copied if (dst / n).exists()]
    return copied


def _commit_dir(tmp: Path, out: Path) -> None:
    """Move every file of `tmp` into `out` with os.replace (atomic per file), then drop `tmp`."""
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _rope_parameters(config) -> dict[str, Any]:
    """transformers-5 `rope_parameters` for a TinyLMConfig (default RoPE or YaRN)."""
    if config.yarn_factor > 1.0:
        return {"rope_type": "yarn", "rope_theta": float(config.rope_theta), "factor": float(config.yarn_factor),
                "original_max_position_embeddings": int(config.yarn_original_max_position)}
    return {"rope_type": "default", "rope_theta": float(config.rope_theta)}


def _context_length(config) -> int:
    # HF convention: max_position_embeddings is the post-YaRN length
    from tinylm.models.config import context_length

    return context_length(config)


# ---------------------------------------------------------------------------------------------
# export: tinylm -> native transformers architecture
# ---------------------------------------------------------------------------------------------
def choose_arch(config, arch: str = "auto", expert_bias_zero: bool = True) -> str:
    """Pick the transformers architecture whose forward equals ours; ValueError says why not."""
    if config.attention == "mla":
        candidates = ["deepseek_v3"]
    elif config.is_moe:
        if config.moe_scoring == "sigmoid":
            candidates = ["dots1", "glm4_moe"] if config.qk_norm else ["glm4_moe"]
        else:
            candidates = ["qwen3_moe"] if config.qk_norm else ["qwen2_moe"]
    else:
        candidates = ["qwen3"] if config.qk_norm else ["llama"]
    if arch == "auto":
        arch = candidates[0]
    if arch not in ARCHES:
        raise ValueError(f"unknown --arch {arch!r}; choose one of: auto, {', '.join(ARCHES)}")
    problems = []
    if arch not in candidates:
        problems.append(f"this model ({'MoE ' + config.moe_scoring if config.is_moe else 'dense'}, "
                        f"qk_norm={config.qk_norm}) maps to {' or '.join(candidates)}")
    if arch in ("qwen3_moe", "qwen2_moe"):
        if config.routed_scaling_factor != 1.0:
            problems.append(f"{arch} has no routed_scaling_factor (model has {config.routed_scaling_factor})")
        if not expert_bias_zero:
            problems.append(f"{arch} has no router selection bias, but the model's expert_bias is non-zero "
                            "(trained with moe_bias_update_rate > 0)")
        if arch == "qwen3_moe" and config.num_shared_experts:
            problems.append("qwen3_moe has no shared experts (model has num_shared_experts="
                            f"{config.num_shared_experts}); use moe_scoring='sigmoid' for a Dots1 export")
    if config.is_moe and arch in ("dots1", "glm4_moe") and config.num_experts_per_tok > config.num_experts:
        problems.append("num_experts_per_tok > num_experts")
    if arch == "deepseek_v3" and config.is_moe and config.moe_scoring != "sigmoid":
        problems.append("deepseek_v3 routes with sigmoid scores (model has moe_scoring='softmax')")
    if arch not in candidates and config.attention == "mla":
        problems.append("MLA attention only maps to deepseek_v3")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (only silu/SwiGLU is exported)")
    if problems:
        raise ValueError(f"cannot export to {arch}: " + "; ".join(problems))
    return arch


def hf_config_for(config, arch: str, dtype: torch.dtype = torch.float32):
    """The transformers config object (LlamaConfig, Qwen3Config, Dots1Config, ...) for `arch`."""
    import transformers

    c = config
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act="silu",
        max_position_embeddings=_context_length(c), rms_norm_eps=c.rms_norm_eps,
        rope_parameters=_rope_parameters(c), tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, attention_dropout=0.0, initializer_range=c.initializer_range,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )
    full = ["full_attention"] * c.num_hidden_layers
    moe = dict(moe_intermediate_size=c.moe_intermediate_size, num_experts_per_tok=c.num_experts_per_tok,
               norm_topk_prob=c.norm_topk_prob)
    if arch == "deepseek_v3":
        return _deepseek_v3_config(c, common, moe, dtype)
    if arch == "llama":
        hf = transformers.LlamaConfig(**common, mlp_bias=False)
    elif arch == "qwen3":
        hf = transformers.Qwen3Config(**common, use_sliding_window=False, sliding_window=None, layer_types=full)
    elif arch in ("dots1", "glm4_moe"):
        extra = dict(n_routed_experts=c.num_experts, n_shared_experts=c.num_shared_experts, n_group=1, topk_group=1,
                     routed_scaling_factor=c.routed_scaling_factor, first_k_dense_replace=c.first_k_dense_replace)
        if arch == "dots1":
            hf = transformers.Dots1Config(**common, **moe, **extra, sliding_window=None, layer_types=full)
        else:
            common["rope_parameters"] = {**common["rope_parameters"], "partial_rotary_factor": 1.0}
            hf = transformers.Glm4MoeConfig(**common, **moe, **extra, use_qk_norm=c.qk_norm, num_mtp_layers=0)
    elif arch == "qwen3_moe":
        hf = transformers.Qwen3MoeConfig(**common, **moe, num_experts=c.num_experts, decoder_sparse_step=1,
                                         mlp_only_layers=list(range(c.first_k_dense_replace)),
                                         use_sliding_window=False, sliding_window=None)
    elif arch == "qwen2_moe":
        hf = transformers.Qwen2MoeConfig(**common, **moe, num_experts=c.num_experts, decoder_sparse_step=1,
                                         mlp_only_layers=list(range(c.first_k_dense_replace)),
                                         shared_expert_intermediate_size=c.moe_intermediate_size * c.num_shared_experts,
                                         qkv_bias=False, use_sliding_window=False)
    else:  # pragma: no cover - choose_arch guards this
        raise ValueError(f"unknown arch {arch!r}")
    hf.architectures = [HF_CLASS[arch]]
    hf.dtype = str(dtype).replace("torch.", "")
    return hf


def _deepseek_v3_config(c, common: dict[str, Any], moe: dict[str, Any], dtype: torch.dtype):
    """DeepseekV3Config for an MLA model; dense models: every layer dense (first_k_dense_replace=L)."""
    import transformers

    common = {k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads")}
    mla = dict(kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None, qk_nope_head_dim=c.qk_nope_head_dim,
               qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, rope_interleave=False,
               num_key_value_heads=c.num_attention_heads)
    if c.is_moe:
        extra = dict(n_routed_experts=c.num_experts, n_shared_experts=c.num_shared_experts, n_group=1, topk_group=1,
                     routed_scaling_factor=c.routed_scaling_factor, first_k_dense_replace=c.first_k_dense_replace)
    else:
        extra = dict(n_routed_experts=1, n_shared_experts=1, n_group=1, topk_group=1, num_experts_per_tok=1,
                     first_k_dense_replace=c.num_hidden_layers)
        moe = {**moe, "num_experts_per_tok": 1}
    hf = transformers.DeepseekV3Config(**common, **{**moe, **extra}, **mla)
    hf.architectures = [HF_CLASS["deepseek_v3"]]
    hf.dtype = str(dtype).replace("torch.", "")
    return hf


def convert_state_dict(state: dict[str, torch.Tensor], config, arch: str) -> dict[str, torch.Tensor]:
    """Rename tinylm weights to `arch` names. Shapes: gate_up_proj (E, 2I, H) -> per-expert (I, H)."""
    out: dict[str, torch.Tensor] = {}
    i_moe = config.moe_intermediate_size
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: transformers re-ties it from embed_tokens
        if name.startswith("mtp."):
            continue  # multi-token prediction modules: training only (docs/model.md)
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :i_moe]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, i_moe:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        elif name.endswith("mlp.gate.expert_bias"):
            if arch in ("dots1", "glm4_moe", "deepseek_v3"):
                out[name.replace("expert_bias", "e_score_correction_bias")] = t.float()
            # qwen*_moe: checked to be zero by choose_arch, nothing to write
        elif arch == "qwen2_moe" and ".mlp.shared_experts." in name:
            new = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
            # Qwen2-MoE multiplies the shared expert by sigmoid(gate(x)); a zero gate gives exactly 0.5,
            # so doubling down_proj (exact in floating point) restores our ungated shared expert.
            out[new] = t * 2 if name.endswith("down_proj.weight") else t
        else:
            out[name] = t
    moe_layers = range(config.first_k_dense_replace, config.num_hidden_layers) if config.is_moe else range(0)
    for li in moe_layers:
        ref = out[f"model.layers.{li}.mlp.gate.weight"]
        if arch == "qwen2_moe":
            out[f"model.layers.{li}.mlp.shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size, dtype=ref.dtype)
        if arch in ("dots1", "glm4_moe", "qwen2_moe", "deepseek_v3") and not config.num_shared_experts:
            # These classes always build a shared expert; ours has none: write it with width 0.
            shared = "shared_expert" if arch == "qwen2_moe" else "shared_experts"
            for p, shape in (("gate_proj", (0, config.hidden_size)), ("up_proj", (0, config.hidden_size)),
                             ("down_proj", (config.hidden_size, 0))):
                out[f"model.layers.{li}.mlp.{shared}.{p}.weight"] = torch.zeros(shape, dtype=ref.dtype)
    return {k: v.contiguous() for k, v in out.items()}


def merge_lora(model, adapter_dir: str):
    """Hook for `export(..., lora=DIR)`: fold a LoRA adapter (tinylm's or PEFT's) into the base weights."""
    from tinylm.models import lora

    return lora.merge_lora(lora.load_adapter(model, adapter_dir))


def export(model_dir: str | Path, out_dir: str | Path, arch: str = "auto", lora: str | None = None,
           dtype: str | None = None) -> str:
    """Write `out_dir`, loadable by plain transformers as a native class. Returns the arch used."""
    from safetensors.torch import save_file

    import tinylm  # noqa: F401  (registers the Auto classes)
    from tinylm.models.loading import resolve_dtype
    from tinylm.models.model import TinyLMForCausalLM

    src, out = Path(model_dir), Path(out_dir)
    raw = _read_config_json(src)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the model directory itself; choose a new directory")
    if raw.get("model_type") != "tinylm":
        if lora:  # any transformers base (SmolLM2, Qwen, ...): merge the adapter, keep the architecture
            return _export_merged_hf(src, out, lora, dtype, raw, arch)
        raise ValueError(f"{src / 'config.json'}: model_type is {raw.get('model_type')!r}, not 'tinylm' "
                         "(it is already a transformers model; nothing to export)")
    model = TinyLMForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if lora:
        model = merge_lora(model, lora)
    config = model.config
    stored = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    target = resolve_dtype(dtype) or resolve_dtype(stored) or torch.float32
    state = {k: v.detach() for k, v in model.state_dict().items()}
    bias_zero = all(bool((v == 0).all()) for k, v in state.items() if k.endswith("expert_bias"))
    arch = choose_arch(config, arch, expert_bias_zero=bias_zero)
    tensors = convert_state_dict(state, config, arch)
    tensors = {k: (v if k.endswith("e_score_correction_bias") else v.to(target)) for k, v in tensors.items()}

    hf_config = hf_config_for(config, arch, target)
    score = read_score_head_of(src)
    if score is not None:  # a reward model (stage reward): *ForSequenceClassification, one label
        tensors.pop("lm_head.weight", None)
        tensors["score.weight"] = score.to(target).contiguous()
        hf_config.num_labels = 1
        hf_config.architectures = [export_class(arch, True)]
    tmp = _staging_dir(out)
    try:
        hf_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if (src / "generation_config.json").exists():
            shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        _copy_tokenizer(src, tmp, portable=True)
        _commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arch


def read_score_head_of(model_dir: Path) -> torch.Tensor | None:
    """The reward head (`score.weight`, (1, hidden)) of a reward-model dir (tinylm/posttrain/reward.py), or None."""
    from tinylm.posttrain.reward import read_score_head

    return read_score_head(model_dir)


def export_class(arch: str, reward_model: bool) -> str:
    """transformers class name of an export: the causal LM, or its *ForSequenceClassification twin
    (a reward model; transformers scores the last non-pad token with `score`, as tinylm does)."""
    return HF_CLASS[arch].replace("ForCausalLM", "ForSequenceClassification") if reward_model else HF_CLASS[arch]


def _export_merged_hf(src: Path, out: Path, lora: str, dtype: str | None, raw: dict[str, Any], arch: str) -> str:
    """`export --merge-lora` for a transformers base: base + adapter merged (fp32), saved in the base's
    own architecture and dtype (or `dtype`), with the adapter's tokenizer if it has one, else the base's."""
    from tinylm.models.loading import load_model_with_adapter, resolve_dtype

    mt = raw.get("model_type")
    if arch not in ("auto", mt):
        raise ValueError(f"--arch {arch}: {src} is a {mt} model; a merged export keeps its architecture")
    model, _ = load_model_with_adapter(lora, base=str(src), merge=True, dtype=torch.float32)
    stored = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    model = model.to(resolve_dtype(dtype) or resolve_dtype(stored) or torch.float32)
    tok_src = Path(lora) if any((Path(lora) / f).exists() for f in TOKENIZER_FILES) else src
    tmp = _staging_dir(out)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        _copy_tokenizer(tok_src, tmp, portable=True)
        _commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return mt


# ---------------------------------------------------------------------------------------------
# import: transformers Llama / Qwen3 / MoE directory -> tinylm
# ---------------------------------------------------------------------------------------------
IMPORTABLE = ("llama", "mistral", "qwen3", "dots1", "glm4_moe", "qwen3_moe", "deepseek_v3")


def tinylm_config_from_hf(hf, where: str = "config.json"):
    """TinyLMConfig equivalent to a transformers config, or ValueError naming what cannot be represented."""
    from tinylm.models.config import TinyLMConfig

    mt = hf.model_type
    if mt not in IMPORTABLE:
        raise ValueError(f"{where}: model_type {mt!r} is not importable; supported: {', '.join(IMPORTABLE)}")
    problems = []
    for flag in ("attention_bias", "mlp_bias", "qkv_bias"):
        if getattr(hf, flag, False):
            problems.append(f"{flag}=true (tinylm has no biases)")
    if getattr(hf, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.hidden_act!r} (tinylm uses SwiGLU/silu)")
    if getattr(hf, "use_sliding_window", False) or any(t != "full_attention" for t in getattr(hf, "layer_types", None) or []) \
            or (mt == "mistral" and getattr(hf, "sliding_window", None)):
        problems.append("sliding-window attention")
    if getattr(hf, "pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={hf.pretraining_tp}")
    rp = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rp.get("rope_type", "default")
    theta = rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    yarn = {}
    if rope_type == "yarn":
        extra = {k for k in ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow") if rp.get(k) is not None}
        if extra or rp.get("truncate", True) is not True:
            problems.append(f"YaRN options {sorted(extra)} other than factor/original_max_position_embeddings")
        yarn = dict(yarn_factor=float(rp["factor"]), yarn_original_max_position=int(rp["original_max_position_embeddings"]))
    elif rope_type != "default":
        problems.append(f"rope_type={rope_type!r} (tinylm supports default RoPE and yarn)")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rp['partial_rotary_factor']}")
    moe: dict[str, Any] = {}
    mla: dict[str, Any] = {}
    if mt == "deepseek_v3":
        mla = dict(attention="mla", kv_lora_rank=hf.kv_lora_rank, q_lora_rank=hf.q_lora_rank or 0,
                   qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
                   v_head_dim=hf.v_head_dim, head_dim=hf.hidden_size // hf.num_attention_heads)
        if rp.get("mscale_all_dim") or rp.get("mscale"):
            problems.append("YaRN mscale / mscale_all_dim (tinylm scales cos/sin only)")
    if mt in ("dots1", "glm4_moe") or (mt == "deepseek_v3" and hf.first_k_dense_replace < hf.num_hidden_layers):
        if (hf.n_group or 1) != 1 or (hf.topk_group or 1) != 1:
            problems.append(f"group-limited routing n_group={hf.n_group}, topk_group={hf.topk_group}")
        moe = dict(num_experts=hf.n_routed_experts, num_shared_experts=hf.n_shared_experts or 0, moe_scoring="sigmoid",
                   first_k_dense_replace=hf.first_k_dense_replace or 0, routed_scaling_factor=hf.routed_scaling_factor)
    elif mt == "qwen3_moe":
        n = hf.num_hidden_layers
        dense = sorted(set(hf.mlp_only_layers or []) | {i for i in range(n) if (i + 1) % hf.decoder_sparse_step})
        if dense != list(range(len(dense))):
            problems.append(f"dense layers {dense} are not the first k layers")
        moe = dict(num_experts=hf.num_experts, num_shared_experts=0, moe_scoring="softmax",
                   first_k_dense_replace=len(dense), routed_scaling_factor=1.0, moe_bias_update_rate=0.0)
    if moe:
        moe.update(num_experts_per_tok=hf.num_experts_per_tok, moe_intermediate_size=hf.moe_intermediate_size,
                   norm_topk_prob=bool(hf.norm_topk_prob))
    qk_norm = mt in ("qwen3", "dots1", "qwen3_moe") or (mt == "glm4_moe" and bool(hf.use_qk_norm))
    if problems:
        raise ValueError(f"{where}: cannot import {mt} into tinylm: " + "; ".join(problems))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if mla:
        qk_norm, head_dim = False, mla.pop("head_dim")
    return TinyLMConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads, head_dim=head_dim,
        max_position_embeddings=hf.max_position_embeddings, rms_norm_eps=hf.rms_norm_eps, rope_theta=float(theta),
        qk_norm=qk_norm, tie_word_embeddings=bool(hf.tie_word_embeddings), initializer_range=hf.initializer_range,
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id, **yarn, **moe,
        **mla)


def _deinterleave_rope(state: dict[str, torch.Tensor], config) -> None:
    """DeepseekV3 with rope_interleave=True rotates pairs (x0, x1), (x2, x3)...; tinylm rotates halves.
    Reordering the RoPE output rows of the projections to (x0, x2, ..., x1, x3, ...) makes them equal
    (q and k are permuted alike, so their dot products are unchanged)."""
    d_r, d_qk = config.qk_rope_head_dim, config.qk_nope_head_dim + config.qk_rope_head_dim
    perm = torch.cat((torch.arange(0, d_r, 2), torch.arange(1, d_r, 2)))
    for name in list(state):
        w = state[name]
        if name.endswith(("q_proj.weight", "q_b_proj.weight")):
            w = w.view(config.num_attention_heads, d_qk, -1).clone()
            w[:, config.qk_nope_head_dim:] = w[:, config.qk_nope_head_dim:][:, perm]
            state[name] = w.view(-1, w.shape[-1])
        elif name.endswith("kv_a_proj_with_mqa.weight"):
            w = w.clone()
            w[config.kv_lora_rank:] = w[config.kv_lora_rank:][perm]
            state[name] = w


def import_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None):
    """Convert a transformers directory (Llama, Qwen3, Dots1, GLM-4-MoE, Qwen3-MoE) to tinylm format."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinylm.models.loading import resolve_dtype
    from tinylm.models.model import TinyLMForCausalLM

    src, out = Path(hf_dir), Path(out_dir)
    raw = _read_config_json(src)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the model directory itself; choose a new directory")
    if raw.get("model_type") == "tinylm":
        raise ValueError(f"{src / 'config.json'}: already a tinylm model")
    hf_cfg = AutoConfig.from_pretrained(str(src))
    config = tinylm_config_from_hf(hf_cfg, where=str(src / "config.json"))
    hf_model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    state = {}
    for name, t in hf_model.state_dict().items():  # transformers 5 already fuses experts to (E, 2I, H)
        name = name.replace("mlp.gate.e_score_correction_bias", "mlp.gate.expert_bias")
        if "rotary_emb" in name:
            continue
        state[name] = t
    if getattr(hf_cfg, "rope_interleave", False):
        _deinterleave_rope(state, config)
    model = TinyLMForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{src}: weights do not map onto tinylm (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    target = resolve_dtype(dtype) or hf_model.dtype
    model = model.to(target)
    tmp = _staging_dir(out)
    try:
        model.save_pretrained(str(tmp))
        if (src / "generation_config.json").exists():
            shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        _copy_tokenizer(src, tmp)
        _commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return config


# ---------------------------------------------------------------------------------------------
# init and info
# ---------------------------------------------------------------------------------------------
def init_model(preset: str, out_dir: str | Path, tokenizer: str | None = None, seed: int = 0, **overrides):
    """Randomly initialised `preset` model + tokenizer + generation_config in `out_dir`."""
    from transformers import GenerationConfig

    from tinylm.models.config import preset_config
    from tinylm.models.loading import load_model
    from tinylm.text.tokenizer import save_pretrained_portable

    preset_config(preset)  # unknown names: ValueError listing the presets
    model, tok = load_model(preset, tokenizer=tokenizer, seed=seed, **overrides)
    eos = [tok.eos_token_id]
    eot = tok.get_vocab().get("<|endoftext|>")  # document end also stops generation
    if eot is not None and eot not in eos:
        eos.append(eot)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=model.config.pad_token_id,
                                               bos_token_id=model.config.bos_token_id)
    out = Path(out_dir)
    tmp = _staging_dir(out)
    try:
        model.save_pretrained(str(tmp))
        save_pretrained_portable(tok, tmp)
        _commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def model_info(model_dir: str | Path) -> dict[str, Any]:
    """Architecture, parameter counts (total / active), vocab, context, dtype, tokenizer of a model dir."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import tinylm  # noqa: F401
    from tinylm.models.config import count_parameters

    path = Path(model_dir)
    raw = _read_config_json(path)
    cfg = AutoConfig.from_pretrained(str(path))
    info: dict[str, Any] = {"path": str(path), "model_type": cfg.model_type,
                            "architecture": (raw.get("architectures") or ["?"])[0]}
    if cfg.model_type == "tinylm":
        total, active = count_parameters(cfg)
        info["features"] = ", ".join(
            [f"MoE {cfg.num_experts} routed + {cfg.num_shared_experts} shared, top-{cfg.num_experts_per_tok} "
             f"({cfg.moe_scoring})" if cfg.is_moe else "dense", "QK-norm" if cfg.qk_norm else "no QK-norm",
             f"YaRN x{cfg.yarn_factor:g}" if cfg.yarn_factor > 1 else "RoPE",
             "tied embeddings" if cfg.tie_word_embeddings else "untied embeddings"])
        try:
            info["exports_to"] = HF_CLASS[choose_arch(cfg)]
        except ValueError as e:
            info["exports_to"] = f"none ({e})"
    else:  # any transformers causal LM: count on the meta device, no weights read
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        total = sum(p.numel() for p in m.parameters())
        n_exp = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
        routed = sum(p.numel() for n, p in m.named_parameters() if ".experts." in n)
        k = getattr(cfg, "num_experts_per_tok", None)
        active = total - routed + (routed * k // n_exp if n_exp and k else routed)
    from tinylm.models.config import context_length

    ctx = context_length(cfg)
    info.update(total_params=total, active_params=active, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                vocab_size=cfg.vocab_size, context_length=ctx,
                dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"))
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        info["tokenizer"] = (f"{type(tok).__name__}, {len(tok)} tokens, eos={tok.eos_token!r}, pad={tok.pad_token!r}, "
                             f"chat_template={'yes' if tok.chat_template else 'no'}")
    else:
        info["tokenizer"] = "none in this directory"
    gen = path / "generation_config.json"
    if gen.exists():
        info["eos_token_id"] = json.loads(gen.read_text()).get("eos_token_id")
    return info


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def _cmd_init(args: argparse.Namespace) -> int:
    from tinylm.models.config import describe_presets

    if args.list or not args.preset:
        print(describe_presets())
        if not args.list:
            print("\nchoose one with: tinylm init --preset NAME --out DIR")
        return 0
    if not args.out:
        raise ValueError("--out DIR is required with --preset")
    model = init_model(args.preset, args.out, tokenizer=args.tokenizer, seed=args.seed)
    from tinylm.models.config import count_parameters

    total, active = count_parameters(model.config)
    print(f"wrote {args.out}: preset {args.preset}, {_fmt_params(total)} params ({_fmt_params(active)} active), "
          f"vocab {model.config.vocab_size}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    for key in ("path", "architecture", "model_type", "features", "exports_to"):
        if key in info:
            print(f"{key:<15} {info[key]}")
    print(f"{'parameters':<15} {_fmt_params(info['total_params'])} total, {_fmt_params(info['active_params'])} active per token")
    for key in ("layers", "hidden", "vocab_size", "context_length", "dtype", "tokenizer", "eos_token_id"):
        if key in info:
            print(f"{key:<15} {info[key]}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    config = import_hf(args.model, args.out, dtype=args.dtype)
    kind = "MoE" if config.is_moe else "dense"
    print(f"wrote {args.out}: tinylm {kind} model, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"qk_norm={config.qk_norm}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a randomly initialised model directory from a preset")
    p.add_argument("--preset", help="preset name (see --list)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the bundled tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the presets with parameter counts")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("info", help="describe a model directory (tinylm or transformers)")
    p.add_argument("model", help="model directory")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("import", help="convert a transformers Llama/Qwen3 directory to tinylm")
    p.add_argument("model", help="transformers model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")
    p.set_defaults(func=_cmd_import)
