"""`tinylm export MODEL --format gguf`: one GGUF file that llama.cpp (and Ollama, LM Studio, ...) runs.

Why a direct writer instead of "export to transformers, then run llama.cpp's convert_hf_to_gguf.py":
that script lives in a llama.cpp checkout users may not have, and it recognises tokenizers by hashing
the output of a fixed test string, which a freshly trained tokenizer never matches. We know our own
model exactly, so we write the file with the PyPI `gguf` package (the same writer the script uses):

    tinylm config                       GGUF architecture (llama.cpp)
    dense, QK-norm                  ->  qwen3      (NEOX RoPE, attn_q_norm / attn_k_norm)
    dense, no QK-norm               ->  llama      (q/k rows re-ordered: llama.cpp's llama RoPE rotates
                                                    adjacent pairs, ours rotates the two halves)
    MoE sigmoid router, QK-norm     ->  dots1      (DeepSeek-V3 routing: selection bias, shared experts,
                                                    leading dense layers, routed scaling)
    MoE softmax router, QK-norm,    ->  qwen3moe   (no shared experts, no leading dense layers,
        no shared experts                           normalised top-k weights)
    anything else                   ->  ValueError naming what llama.cpp has no equivalent for

Tensor names come from the package's own tables (`gguf.TENSOR_NAMES`), so they track llama.cpp.
The tokenizer is written as `gpt2` BPE with pre-tokenizer `gpt-2`: llama.cpp's GPT-2 split regex is
the one `tokenizers`' ByteLevel(use_regex=True, add_prefix_space=False) uses, which is ours.
Checked token-for-token and logit-for-logit against llama.cpp itself in tests/test_gguf.py.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFSummary:
    """What `export_gguf` wrote, for the CLI message and the tests."""
    path: str
    arch: str
    outtype: str
    n_tensors: int
    n_bytes: int
    fallback_f16: list[str]  # q8_0 tensors whose rows are not a multiple of 32, written as f16


# ---------------------------------------------------------------------------------------------
# checking an export in llama.cpp
# ---------------------------------------------------------------------------------------------
def cpu_has_amx() -> bool:
    """True on x86 CPUs with AMX int8 tiles (Intel Sapphire Rapids and later)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return " amx_int8" in f.read()
    except OSError:
        return False


def open_in_llama_cpp(path: str | Path, extra_buffers: bool | None = None, **kwargs):
    """`llama_cpp.Llama(path, **kwargs)` (PyPI llama-cpp-python), for checking an exported GGUF.

    On AMX CPUs, llama.cpp's AMX weight buffers (its "extra buffer types", used for q4_0 / q8_0 / K-quants)
    crash with a segmentation fault whenever one llama_decode holds more than one token (llama-cpp-python
    0.3.36, `tiny` and `small` q8_0 exports, any thread count; one token per decode works; f32 is
    unaffected; cf. llama.cpp issue 20824), so by default (`extra_buffers=None`) they are switched off
    there (llama.cpp's `--no-repack`). `extra_buffers=True` keeps them: then pass n_batch=1, n_ubatch=1."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level  # the ctypes module Llama() calls

    if extra_buffers or (extra_buffers is None and not cpu_has_amx()):
        return llama_cpp.Llama(str(path), **kwargs)
    default = low_level.llama_model_default_params

    def no_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = no_extra_buffers  # Llama() reads it once, in __init__
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        low_level.llama_model_default_params = default


# ---------------------------------------------------------------------------------------------
# architecture choice
# ---------------------------------------------------------------------------------------------
def gguf_arch(config, expert_bias_zero: bool = True) -> str:
    """The llama.cpp architecture whose forward equals ours; ValueError lists every mismatch."""
    problems = []
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (only silu/SwiGLU is exported)")
    if getattr(config, "attention", "gqa") == "mla":
        problems.append("MLA attention is not exported to GGUF by tinylm (export with --format hf, which "
                        "writes DeepseekV3ForCausalLM, and convert that with llama.cpp's convert_hf_to_gguf.py)")
    if not config.is_moe:
        arch = "qwen3" if config.qk_norm else "llama"
    elif config.moe_scoring == "sigmoid":
        arch = "dots1"
        if not config.qk_norm:
            problems.append("llama.cpp's dots1 (sigmoid-routed MoE) has QK-norm; this model has none "
                            "(export with --format hf --arch glm4_moe and convert with llama.cpp instead)")
    else:
        arch = "qwen3moe"
        if not config.qk_norm:
            problems.append("qwen3moe has QK-norm; this model has none")
        if config.num_shared_experts:
            problems.append(f"qwen3moe has no shared experts (model has {config.num_shared_experts})")
        if config.first_k_dense_replace:
            problems.append(f"qwen3moe has no leading dense layers (first_k_dense_replace={config.first_k_dense_replace})")
        if not config.norm_topk_prob:
            problems.append("llama.cpp's qwen3moe always normalises the top-k weights (norm_topk_prob=false)")
        if config.routed_scaling_factor != 1.0:
            problems.append(f"qwen3moe has no routed_scaling_factor ({config.routed_scaling_factor})")
        if not expert_bias_zero:
            problems.append("qwen3moe has no router selection bias, but expert_bias is non-zero")
    if problems:
        raise ValueError(f"cannot export to GGUF ({arch}): " + "; ".join(problems))
    return arch


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------
def _name(kind: str, bid: int | None = None, suffix: str = "weight") -> str:
    import gguf

    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].format(bid=bid) + "." + suffix


def _halves_to_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from (first half, second half) to interleaved pairs (0, d/2, 1, d/2+1, ...).

    Our RoPE (and HF's) rotates dimension i with i + d/2; llama.cpp's `llama` RoPE rotates 2i with 2i+1.
    Applying the same row permutation to q and k leaves q.k unchanged, so attention is identical.
    """
    out, inner = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inner).swapaxes(1, 2).reshape(out, inner)


def _repeat_kv_heads(w: np.ndarray, n_kv: int, n_heads: int) -> np.ndarray:
    """k/v rows of each KV head repeated for every query head that shares it (exact GQA -> MHA).

    llama.cpp's dots1 loader sizes attn_k/attn_v for n_head heads (no GQA); query head h reads KV head
    h // (n_heads / n_kv) in our attention, so repeating each KV head consecutively keeps the output.
    """
    if n_kv == n_heads:
        return w
    return np.repeat(w.reshape(n_kv, -1, w.shape[1]), n_heads // n_kv, axis=0).reshape(-1, w.shape[1])


_LAYER_MAP = {
    "input_layernorm.weight": "ATTN_NORM", "post_attention_layernorm.weight": "FFN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q", "self_attn.k_proj.weight": "ATTN_K", "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT", "self_attn.q_norm.weight": "ATTN_Q_NORM",
    "self_attn.k_norm.weight": "ATTN_K_NORM", "mlp.gate_proj.weight": "FFN_GATE", "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN", "mlp.gate.weight": "FFN_GATE_INP",
    "mlp.shared_experts.gate_proj.weight": "FFN_GATE_SHEXP", "mlp.shared_experts.up_proj.weight": "FFN_UP_SHEXP",
    "mlp.shared_experts.down_proj.weight": "FFN_DOWN_SHEXP", "mlp.experts.down_proj": "FFN_DOWN_EXP",
}


def gguf_tensors(state: dict[str, torch.Tensor], config, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in PyTorch's (out, in) order) for every weight llama.cpp reads."""
    for name, t in state.items():
        a = t.detach().float().cpu().numpy()
        if name == "model.embed_tokens.weight":
            yield _name("TOKEN_EMBD"), a
        elif name == "model.norm.weight":
            yield _name("OUTPUT_NORM"), a
        elif name == "lm_head.weight":
            # tied: llama.cpp's qwen3/llama/qwen3moe reuse token_embd; its dots1 loader requires output
            if not config.tie_word_embeddings or arch == "dots1":
                yield _name("OUTPUT"), a
        elif name.startswith("model.layers."):
            yield from _layer_tensor(name, a, config, arch)
        elif name.startswith("mtp."):
            continue  # multi-token prediction modules: training only (tinylm/models/mtp.py)
        else:
            raise ValueError(f"weight {name!r} has no GGUF equivalent")


def _layer_tensor(name: str, a: np.ndarray, config, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    bid_s, rest = name[len("model.layers."):].split(".", 1)
    bid = int(bid_s)
    if rest == "mlp.gate.expert_bias":
        if arch == "dots1":  # qwen3moe: zero by gguf_arch's check, nothing to write
            yield _name("FFN_EXP_PROBS_B", bid, "bias"), a
    elif rest == "mlp.experts.gate_up_proj":  # (E, 2I, H) -> gate (E, I, H), up (E, I, H)
        i = config.moe_intermediate_size
        yield _name("FFN_GATE_EXP", bid), np.ascontiguousarray(a[:, :i])
        yield _name("FFN_UP_EXP", bid), np.ascontiguousarray(a[:, i:])
    elif rest in _LAYER_MAP:
        if arch == "dots1" and rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            a = _repeat_kv_heads(a, config.num_key_value_heads, config.num_attention_heads)
        if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = config.num_attention_heads if "q_proj" in rest else config.num_key_value_heads
            a = _halves_to_pairs(a, heads)
        yield _name(_LAYER_MAP[rest], bid), a
    else:
        raise ValueError(f"weight {name!r} has no GGUF equivalent")


def encode_tensor(name: str, a: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) for one tensor. Norms, biases and the router stay f32, as llama.cpp's converter
    keeps them: they are tiny and the router's top-k choice is sensitive to rounding."""
    import gguf

    Q = gguf.GGMLQuantizationType
    keep_f32 = a.ndim == 1 or ".ffn_gate_inp." in name
    if outtype == "f32" or keep_f32:
        return a.astype(np.float32), Q.F32
    if outtype == "f16" or (outtype == "q8_0" and a.shape[-1] % 32):
        return a.astype(np.float16), Q.F16
    qtype = Q.BF16 if outtype == "bf16" else Q.Q8_0
    return gguf.quants.quantize(a, qtype), qtype


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------
def add_hparams(w, config, arch: str, outtype: str) -> None:
    """Architecture keys (`{arch}.*`) llama.cpp reads for these four architectures."""
    import gguf

    from tinylm.models.config import context_length

    c = config
    w.add_context_length(context_length(c))
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_attention_heads if arch == "dots1" else c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    if c.yarn_factor > 1.0:  # llama.cpp's YaRN: same ramp (beta_fast 32, beta_slow 1) and 0.1 ln(s) + 1 scale
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(c.yarn_factor))
        w.add_rope_scaling_orig_ctx_len(int(c.yarn_original_max_position))
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if arch == "dots1":
        w.add_leading_dense_block_count(c.first_k_dense_replace)
        w.add_expert_shared_count(c.num_shared_experts)
        w.add_expert_weights_scale(float(c.routed_scaling_factor))
        w.add_expert_weights_norm(bool(c.norm_topk_prob))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    ftype = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[outtype]
    w.add_file_type(gguf.LlamaFileType[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _read_tokenizer(tok_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    tj, tc = tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json"
    if not tj.exists():
        raise FileNotFoundError(f"{tok_dir}: no tokenizer.json (GGUF embeds the tokenizer; pass a model "
                                "directory saved by tinylm)")
    cfg = json.loads(tc.read_text(encoding="utf-8")) if tc.exists() else {}
    jinja = tok_dir / "chat_template.jinja"
    if not cfg.get("chat_template") and jinja.exists():
        cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    return json.loads(tj.read_text(encoding="utf-8")), cfg


def tokenizer_dir(model_dir: str | Path, lora: str | None = None) -> Path:
    """Where the exported tokenizer comes from: the adapter's own (SFT may add tokens), else the model's."""
    if lora and (Path(lora) / "tokenizer.json").exists():
        return Path(lora)
    return Path(model_dir)


def chat_template_of(tok_dir: Path) -> str | None:
    """The chat template a model directory ships (tokenizer_config.json or chat_template.jinja)."""
    return _read_tokenizer(tok_dir)[1].get("chat_template")


def _check_byte_level(tj: dict[str, Any], where: Path) -> None:
    """Only our tokenizer family maps onto llama.cpp's `gpt-2` pre-tokenizer exactly; refuse others."""
    pre, model = tj.get("pre_tokenizer") or {}, tj.get("model") or {}
    ok = (model.get("type") == "BPE" and tj.get("normalizer") is None and pre.get("type") == "ByteLevel"
          and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))
    if not ok:
        raise ValueError(f"{where}/tokenizer.json: GGUF export supports tinylm's byte-level BPE tokenizer "
                         "(ByteLevel pre-tokenizer, GPT-2 regex, no prefix space, no normaliser); this one "
                         f"has pre_tokenizer {pre.get('type')!r}, model {model.get('type')!r}. Use "
                         "`tinylm export --format hf` and llama.cpp's convert_hf_to_gguf.py for it")


def token_table(tj: dict[str, Any], vocab_size: int, where: Path) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types, following Qwen3's GGUFs:

    - `<|...|>` special tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`) are CONTROL: conversation
      structure, never printed by llama.cpp / Ollama;
    - the other added tokens (`<think>`, `<answer>`, `<tool_call>` and their closers) are USER_DEFINED:
      still one token each when tokenizing, but printed, so the reasoning and tool-call parsers of
      llama.cpp's server and Ollama find them in the generated text;
    - rows past the tokenizer up to the model's vocab_size are UNUSED padding.
    """
    import gguf

    T = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (t, T.NORMAL) for t, i in tj["model"]["vocab"].items()}
    for a in tj.get("added_tokens", []):
        c = a["content"]
        control = a.get("special") and c.startswith("<|") and c.endswith("|>")
        by_id[a["id"]] = (c, T.CONTROL if control else T.USER_DEFINED)
    n = max(by_id) + 1
    if n > vocab_size:
        raise ValueError(f"{where}: tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tok, typ = by_id.get(i, (f"[PAD{i}]", T.UNUSED))
        tokens.append(tok)
        types.append(int(typ))
    return tokens, types


def add_tokenizer(w, tok_dir: Path, vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* keys: gpt2 BPE vocab + merges, token types, special ids, chat template."""
    tj, cfg = _read_tokenizer(tok_dir)
    _check_byte_level(tj, tok_dir)
    tokens, types = token_table(tj, vocab_size, tok_dir)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}

    def special(key: str) -> int | None:
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return ids.get(v) if isinstance(v, str) else None

    eos, pad = special("eos_token"), special("pad_token")
    # No BOS is ever added (add_bos=false); llama.cpp still wants an id, and "<|endoftext|>" is the
    # document boundary our pretraining uses, as in Qwen's GGUFs.
    bos = special("bos_token") if special("bos_token") is not None else ids.get("<|endoftext|>")
    for setter, v in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos), (w.add_pad_token_id, pad)):
        if v is not None:
            setter(v)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if cfg.get("chat_template"):
        w.add_chat_template(cfg["chat_template"])
    return {"eos": eos, "pad": pad, "bos": bos, "chat_template": cfg.get("chat_template")}


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _load(model_dir: Path, lora: str | None):
    import tinylm  # noqa: F401  (registers the Auto classes)
    from tinylm.export.interop import _read_config_json, merge_lora, read_score_head_of
    from tinylm.models.model import TinyLMForCausalLM

    raw = _read_config_json(model_dir)
    if raw.get("model_type") != "tinylm":
        raise ValueError(f"{model_dir / 'config.json'}: model_type is {raw.get('model_type')!r}; --format gguf "
                         "exports tinylm models (use llama.cpp's convert_hf_to_gguf.py for transformers models)")
    if read_score_head_of(model_dir) is not None:
        raise ValueError(f"{model_dir} is a reward model (it has a score head); GGUF/llama.cpp runs causal LMs, "
                         "so export it with --format hf (a *ForSequenceClassification class) instead")
    model = TinyLMForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return merge_lora(model, lora) if lora else model


def _require_gguf():
    """The `gguf` package, or a clear error: it is only needed for this export (the dev extra has it)."""
    try:
        import gguf
    except ImportError:
        raise ImportError("--format gguf needs the `gguf` package: pip install gguf") from None
    if not hasattr(gguf.MODEL_ARCH, "DOTS1") or not hasattr(gguf.MODEL_ARCH, "QWEN3MOE"):
        raise ImportError(f"gguf {getattr(gguf, '__version__', '?')} predates the qwen3 / dots1 architectures; "
                          "pip install -U gguf (tested with 0.19)")
    return gguf


def export_gguf(model_dir: str | Path, out_file: str | Path, outtype: str = "f16", lora: str | None = None) -> GGUFSummary:
    """Write `out_file` (atomically: a temp file in the same directory, then os.replace)."""
    gguf = _require_gguf()

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    src, out = Path(model_dir), Path(out_file)
    model = _load(src, lora)
    config = model.config
    state = {k: v for k, v in model.state_dict().items()}
    bias_zero = all(bool((v == 0).all()) for k, v in state.items() if k.endswith("expert_bias"))
    arch = gguf_arch(config, expert_bias_zero=bias_zero)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(src.resolve().name)
        add_hparams(w, config, arch, outtype)
        add_tokenizer(w, tokenizer_dir(src, lora), config.vocab_size)
        n, fallback = 0, []
        for name, a in gguf_tensors(state, config, arch):
            data, qtype = encode_tensor(name, a, outtype)
            if outtype == "q8_0" and qtype == gguf.GGMLQuantizationType.F16:
                fallback.append(name)
            w.add_tensor(name, data, raw_dtype=qtype)
            n += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it owner-only; a model file is normally shared
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return GGUFSummary(str(out), arch, outtype, n, out.stat().st_size, fallback)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """`--format gguf`: one llama.cpp file (tinylm/export/gguf_export.py), plus a Modelfile with --ollama."""
    from tinylm.export.ollama import check_template, write_modelfile

    if args.arch != "auto" or args.dtype:
        raise ValueError("--format gguf chooses the llama.cpp architecture itself and takes --outtype, "
                         "not --arch / --dtype")
    if not args.out.endswith(".gguf"):
        raise ValueError(f"--out {args.out}: with --format gguf, --out is a file name ending in .gguf")
    template = chat_template_of(tokenizer_dir(args.model, args.merge_lora))
    if args.ollama:  # fail before the export, not after
        check_template(template)
    s = export_gguf(args.model, args.out, outtype=args.outtype or "f16", lora=args.merge_lora)
    print(f"wrote {s.path}: GGUF {s.arch}, {s.outtype}, {s.n_tensors} tensors, {s.n_bytes / 1e6:.1f} MB")
    if s.fallback_f16:
        print(f"  {len(s.fallback_f16)} tensor(s) with rows not a multiple of 32 written as f16: {s.fallback_f16[:3]}")
    print(f"llama.cpp: llama-cli -m {s.path} -cnv   (or: python -m llama_cpp.server --model {s.path})")
    if args.ollama:
        mf = write_modelfile(s.path, template)
        print(f"wrote {mf}; Ollama: cd {mf.parent} && ollama create NAME -f Modelfile && ollama run NAME")
    return 0


# ---------------------------------------------------------------------------------------------
# `tinylm export` (both formats: it lives here, above interop.py, so the two modules form no cycle)
# ---------------------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return cmd_export_gguf(args)
    if args.ollama or args.outtype:
        raise ValueError("--ollama and --outtype go with --format gguf")
    from tinylm.export.interop import HF_CLASS, export, export_class, read_score_head_of

    arch = export(args.model, args.out, arch=args.arch, lora=args.merge_lora, dtype=args.dtype)
    rm = arch in HF_CLASS and read_score_head_of(Path(args.out)) is not None
    auto = "AutoModelForSequenceClassification" if rm else "AutoModelForCausalLM"
    print(f"wrote {args.out} as {export_class(arch, rm) if arch in HF_CLASS else arch} (loads with plain "
          f"transformers: {auto}.from_pretrained({str(args.out)!r}))")
    print(f"llama.cpp / Ollama: tinylm export {args.model} --format gguf --out model.gguf [--ollama]")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    from tinylm.export.interop import ARCHES

    p = sub.add_parser("export", help="write a plain-transformers (Llama/Qwen3/Dots1/...) directory")
    p.add_argument("model", help="tinylm model directory")
    p.add_argument("--out", required=True, help="output directory (--format gguf: the .gguf file)")
    p.add_argument("--arch", default="auto", choices=("auto", *ARCHES), help="target architecture (default: auto)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")
    p.add_argument("--merge-lora", default=None, metavar="ADAPTER_DIR",
                   help="fold a LoRA adapter in first (also for a transformers base: saved merged, same architecture)")
    p.add_argument("--format", default="hf", choices=("hf", "gguf"),
                   help="hf: a transformers directory (default); gguf: one llama.cpp / Ollama file (--out X.gguf)")
    p.add_argument("--outtype", default=None, choices=("f32", "f16", "bf16", "q8_0"),
                   help="GGUF weight type (default f16; norms and the MoE router stay f32)")
    p.add_argument("--ollama", action="store_true", help="with --format gguf: also write a Modelfile next to it")
    p.set_defaults(func=_cmd_export)
