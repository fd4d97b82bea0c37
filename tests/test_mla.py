"""Multi-head latent attention (tinylm/models/mla.py): cached (absorbed) path == training path, and export /
import parity with transformers' DeepseekV3ForCausalLM (the reference), checked in a process that
never imports tinylm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tinylm
from tinylm.export.interop import choose_arch, export, import_hf
from tinylm.inference.generate import SamplingParams, generate
from tinylm.models.config import TinyLMConfig, preset_config
from tinylm.models.kv_cache import StaticKVCache
from tinylm.models.mla import kv_bytes_per_token

TOL = 1e-4
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, eos_token_id=2, pad_token_id=0, qk_norm=False,
            attention="mla", kv_lora_rank=24, q_lora_rank=0, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
CASES = {
    "dense": dict(),
    "qlora_untied": dict(q_lora_rank=20, tie_word_embeddings=False),
    "moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                first_k_dense_replace=1, routed_scaling_factor=2.0),
    "yarn": dict(yarn_factor=4.0, yarn_original_max_position=16),
}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(93)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_model(name: str, seed: int = 0) -> tinylm.TinyLMForCausalLM:
    torch.manual_seed(seed)
    model = tinylm.TinyLMForCausalLM(TinyLMConfig(**{**BASE, **CASES[name]})).eval()
    for _, moe in model.moe_layers():  # a trained-looking selection bias
        moe.gate.expert_bias.normal_(0, 0.05)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_absorbed_cache_path_equals_training_path(name):
    """Prefill + decode through the latent-only static cache equals one uncached forward."""
    model = make_model(name)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = StaticKVCache(model.config, 2, 32)
        parts = [model(x[:, :15], cache=cache).logits, model(x[:, 15:16], cache=cache).logits,
                 model(x[:, 16:], cache=cache).logits]
    assert max_diff(torch.cat(parts, dim=1), full) <= TOL
    assert cache.keys[0].shape == (2, 1, 32, 24 + 8) and cache.values[0].numel() == 0


def test_kv_bytes_per_token_presets():
    small, small_mla = preset_config("small"), preset_config("small-mla")
    assert kv_bytes_per_token(small) == 2 * 4 * 64 * 8 * 2
    assert kv_bytes_per_token(small_mla) == (128 + 32) * 8 * 2
    c = StaticKVCache(small_mla, 1, 4)
    assert sum(t.numel() for t in c.keys + c.values) * 2 // 4 == kv_bytes_per_token(small_mla)
    c = StaticKVCache(small, 1, 4)
    assert sum(t.numel() for t in c.keys + c.values) * 2 // 4 == kv_bytes_per_token(small)


def test_generate_and_lora_on_latent_projection():
    """tinylm.inference.generate (static cache) equals full forwards, also with a LoRA on kv_b_proj (absorbed
    weights must include the adapter)."""
    from tinylm.models.lora import apply_lora

    model = make_model("qlora_untied")
    prompt = [5, 9, 17, 33, 60]

    def full_greedy(n: int) -> list[int]:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        return ids[len(prompt):]

    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    assert generate(model, tiny_tokenizer(), [prompt], greedy)[0].token_ids == full_greedy(8)
    # batched rows of different lengths (right-padded prefill, per-row cache lengths) = one by one
    prompts = [prompt, [7, 8], [40, 41, 42, 43, 44, 45, 46, 47]]
    batched = generate(model, tiny_tokenizer(), prompts, greedy, max_batch=3)
    assert [c.token_ids for c in batched] == [generate(model, tiny_tokenizer(), [p], greedy)[0].token_ids for p in prompts]
    apply_lora(model, dict(r=4, alpha=8, target_modules=["q_b_proj", "kv_b_proj", "o_proj"]))
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("kv_b_proj"):
                m.lora_B.weight.normal_(0, 0.5)
    model.eval()
    assert generate(model, tiny_tokenizer(), [prompt], greedy)[0].token_ids == full_greedy(8)


def test_config_errors():
    with pytest.raises(ValueError, match="attention 'xyz'"):
        TinyLMConfig(**{**BASE, "attention": "xyz"})
    with pytest.raises(ValueError, match="qk_rope_head_dim=7 must be even"):
        TinyLMConfig(**{**BASE, "qk_rope_head_dim": 7})
    with pytest.raises(ValueError, match="deepseek_v3 routes with sigmoid"):
        choose_arch(TinyLMConfig(**{**BASE, **CASES["moe"], "moe_scoring": "softmax"}), "auto")
    with pytest.raises(ValueError, match="MLA attention only maps to deepseek_v3"):
        choose_arch(TinyLMConfig(**BASE), "llama")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla")
    out = {}
    for name in CASES:
        model = make_model(name)
        model.save_pretrained(root / name / "src")
        export(root / name / "src", root / name / "out")
        out[name] = (model, root / name / "out")
    return out


def test_export_matches_deepseek_v3_without_tinylm(exported, tmp_path):
    """Full forward and cached greedy decoding of transformers' DeepseekV3ForCausalLM, in a fresh
    interpreter that never imports tinylm, equal ours."""
    x = [[5, 9, 17, 33, 60, 2, 7, 11, 3, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]  # > yarn original 16
    dirs, expected, greedy = {}, {}, {}
    for name, (model, out) in exported.items():
        dirs[name] = str(out)
        with torch.no_grad():
            expected[name] = model(torch.tensor(x)).logits
        sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
        greedy[name] = generate(model, tiny_tokenizer(), [x[0][:5]], sp)[0].token_ids
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        res = {{}}
        for name, d in {dirs!r}.items():
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = m(torch.tensor({x!r})).logits
                gen = m.generate(torch.tensor([{x[0][:5]!r}]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
            res[name] = dict(cls=type(m).__name__, logits=logits.tolist(), gen=gen)
        assert "tinylm" not in sys.modules, "tinylm was imported"
        print(json.dumps(res))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in CASES:
        assert res[name]["cls"] == "DeepseekV3ForCausalLM"
        assert max_diff(torch.tensor(res[name]["logits"]), expected[name]) <= TOL, name
        assert res[name]["gen"] == greedy[name], name


def test_import_round_trip_and_interleaved_rope(exported, tmp_path):
    """Export -> import gives the same model; a DeepseekV3 checkpoint with interleaved RoPE (the
    original layout) imports with permuted rows and equal logits."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    model, out = exported["moe"]
    config = import_hf(out, tmp_path / "back")
    assert config.attention == "mla" and config.num_experts == 4
    back = tinylm.TinyLMForCausalLM.from_pretrained(tmp_path / "back").eval()
    x = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_diff(back(x).logits, model(x).logits) <= TOL

    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24, q_lora_rank=16,
                              qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, first_k_dense_replace=2,
                              n_routed_experts=1, n_shared_experts=1, rope_interleave=True,
                              max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "ds")
    import_hf(tmp_path / "ds", tmp_path / "ds_tl")
    ours = tinylm.TinyLMForCausalLM.from_pretrained(tmp_path / "ds_tl").eval()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").eval()
    with torch.no_grad():
        assert max_diff(ours(x).logits, hf(x).logits) <= TOL
