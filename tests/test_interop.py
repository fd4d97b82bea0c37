"""Export / import parity with transformers' own classes (the reference users trust).

Every exported architecture must give the same logits as tinylm (max abs diff <= 1e-4 in fp32) for a
full forward, for KV-cached prefill + step decode, and for left-padded batches; greedy generate()
must produce identical tokens. The export is also loaded in a fresh interpreter without tinylm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import tinylm
from tinylm.export.interop import choose_arch, export, import_hf, init_model, model_info
from tinylm.models.config import TinyLMConfig
from tinylm.models.hf_compat import cache_kwargs, output_cache

TOL = 1e-4
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
CASES = {  # name -> (config overrides, expected transformers class)
    "llama": (dict(qk_norm=False), "LlamaForCausalLM"),
    "qwen3": (dict(qk_norm=True, tie_word_embeddings=False), "Qwen3ForCausalLM"),
    "dots1": (dict(qk_norm=True, **MOE, num_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.0),
              "Dots1ForCausalLM"),
    "glm4_moe": (dict(qk_norm=False, **MOE, num_shared_experts=2, norm_topk_prob=False), "Glm4MoeForCausalLM"),
    "qwen3_moe": (dict(qk_norm=True, **MOE, num_shared_experts=0, moe_scoring="softmax", moe_bias_update_rate=0.0),
                  "Qwen3MoeForCausalLM"),
    "qwen2_moe": (dict(qk_norm=False, **MOE, num_shared_experts=1, moe_scoring="softmax", moe_bias_update_rate=0.0),
                  "Qwen2MoeForCausalLM"),
    "llama_yarn": (dict(qk_norm=False, yarn_factor=4.0, yarn_original_max_position=16), "LlamaForCausalLM"),
}
PARITY = list(CASES)  # every mapping gets the full cache / padding / generate checks


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(93)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_model(name: str, seed: int = 0) -> tinylm.TinyLMForCausalLM:
    torch.manual_seed(seed)
    model = tinylm.TinyLMForCausalLM(TinyLMConfig(**{**BASE, **CASES[name][0]})).eval()
    for _, moe in model.moe_layers():  # a trained-looking selection bias (exported as e_score_correction_bias)
        if model.config.moe_scoring == "sigmoid":
            moe.gate.expert_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (tinylm model, exported transformers model, export dir); built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model = make_model(name)
            model.save_pretrained(root / "src")
            tiny_tokenizer().save_pretrained(root / "src")
            model.generation_config.save_pretrained(root / "src")
            export(root / "src", root / "out")
            hf = AutoModelForCausalLM.from_pretrained(root / "out", dtype=torch.float32).eval()
            cache[name] = (model, hf, root / "out")
        return cache[name]

    return get


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_full_forward_matches(exported, name):
    model, hf, out = exported(name)
    assert type(hf).__name__ == CASES[name][1]
    assert json.loads((out / "config.json").read_text())["architectures"] == [CASES[name][1]]
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))  # > yarn original length 16
    with torch.no_grad():
        assert max_diff(model(x).logits, hf(x).logits) <= TOL


@pytest.mark.parametrize("name", PARITY)
def test_kv_cache_prefill_and_decode_match(exported, name):
    model, hf, _ = exported(name)
    x = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(x[:, :8], use_cache=True), hf(x[:, :8], use_cache=True)
        assert max_diff(a.logits, b.logits) <= TOL
        pa, pb = output_cache(a), output_cache(b)
        for t in range(8, 12):  # one token at a time, each side with its own cache
            a = model(x[:, t:t + 1], cache=pa, use_cache=True)
            b = hf(x[:, t:t + 1], use_cache=True, **cache_kwargs(pb))
            assert max_diff(a.logits, b.logits) <= TOL
            pa, pb = output_cache(a), output_cache(b)


@pytest.mark.parametrize("name", PARITY)
def test_left_padded_batch_matches(exported, name):
    model, hf, _ = exported(name)
    x = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[1, :1] = 0
    x = x.masked_fill(mask == 0, 0)
    real = mask.bool()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for kw in ({}, {"position_ids": pos}):
            a = model(x, attention_mask=mask, **kw).logits
            b = hf(x, attention_mask=mask, **kw).logits
            assert max_diff(a[real], b[real]) <= TOL
        # the padded row equals the same prompt run alone (with pad-aware positions)
        alone = model(x[0:1, 4:]).logits[0]
        assert max_diff(model(x, attention_mask=mask, position_ids=pos).logits[0, 4:], alone) <= TOL


@pytest.mark.parametrize("name", PARITY)
def test_packed_sequences_match(exported, name):
    """Packed rows (position_ids restarting per sequence, no attention mask, no cache): transformers' packed-
    sequence masking, which tinylm's packed SFT relies on; each piece equals its own forward."""
    model, hf, _ = exported(name)
    x = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], list(range(12))])
    with torch.no_grad():
        a, b = model(x, position_ids=pos).logits, hf(x, position_ids=pos, use_cache=False).logits
        assert max_diff(a, b) <= TOL
        assert max_diff(a[0, 5:8], model(x[0:1, 5:8]).logits[0]) <= TOL


@pytest.mark.parametrize("name", PARITY)
def test_greedy_generate_identical(exported, name):
    model, hf, _ = exported(name)
    x = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    x = x.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = model.generate(x, **kw)
        b = hf.generate(x, **kw)
    assert a.shape == (2, 16)
    assert torch.equal(a, b)


def test_export_loads_in_plain_transformers_without_tinylm(exported, tmp_path):
    """A fresh interpreter that never imports tinylm loads every export; logits match."""
    dirs, expected = {}, {}
    x = [[5, 9, 17, 33, 60, 2, 7]]
    for name in PARITY:
        model, _, out = exported(name)
        dirs[name] = str(out)
        with torch.no_grad():
            expected[name] = model(torch.tensor(x)).logits
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        res = {{}}
        for name, d in {dirs!r}.items():
            m = AutoModelForCausalLM.from_pretrained(d).eval()
            tok = AutoTokenizer.from_pretrained(d)
            gen = GenerationConfig.from_pretrained(d)
            with torch.no_grad():
                logits = m(torch.tensor({x!r})).logits
            res[name] = dict(cls=type(m).__name__, logits=logits.tolist(), eos=tok.eos_token, gen_eos=gen.eos_token_id)
        assert "tinylm" not in sys.modules, "tinylm was imported"
        print(json.dumps(res))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in PARITY:
        assert res[name]["cls"] == CASES[name][1]
        assert res[name]["eos"] == "<|im_end|>"
        assert max_diff(torch.tensor(res[name]["logits"]), expected[name]) <= TOL


def test_untied_embeddings_exported_separately(exported):
    model, hf, out = exported("qwen3")
    assert not hf.config.tie_word_embeddings
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    assert torch.equal(hf.lm_head.weight, model.lm_head.weight)
    model_t, hf_t, _ = exported("llama")
    assert hf_t.config.tie_word_embeddings
    assert hf_t.lm_head.weight.data_ptr() == hf_t.model.embed_tokens.weight.data_ptr()


def test_export_bf16_dtype(exported, tmp_path):
    _, _, out = exported("llama")
    src = out.parent / "src"
    export(src, tmp_path / "bf16", dtype="bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf.dtype == torch.bfloat16


def hf_llama_dir(tmp_path, tie: bool, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, **overrides)
    m = LlamaForCausalLM(cfg).eval()
    d = tmp_path / f"hf_llama_{tie}"
    m.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return m, d


@pytest.mark.parametrize("tie", [True, False])
def test_import_llama_gives_identical_logits(tmp_path, tie):
    hf, d = hf_llama_dir(tmp_path, tie, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    config = import_hf(d, tmp_path / "tl")
    assert config.tie_word_embeddings == tie and not config.qk_norm and config.rope_theta == 5000.0
    model = tinylm.TinyLMForCausalLM.from_pretrained(tmp_path / "tl").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "tl").eos_token == "<|im_end|>"
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert max_diff(model(x).logits, hf(x).logits) <= TOL


def test_import_qwen3_round_trip(exported, tmp_path):
    model, _, out = exported("qwen3")
    config = import_hf(out, tmp_path / "back")
    back = tinylm.TinyLMForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert config.qk_norm and not config.tie_word_embeddings
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert max_diff(model(x).logits, back(x).logits) <= TOL


def test_import_refuses_what_tinylm_cannot_represent(tmp_path):
    _, d = hf_llama_dir(tmp_path, True, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        import_hf(d, tmp_path / "x")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    q = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    q.save_pretrained(tmp_path / "q2")
    with pytest.raises(ValueError, match="qwen2.*not importable"):
        import_hf(tmp_path / "q2", tmp_path / "y")


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        model_info(tmp_path / "missing")
    dense = TinyLMConfig(**BASE, qk_norm=False)
    with pytest.raises(ValueError, match="maps to llama"):
        choose_arch(dense, "qwen3")
    with pytest.raises(ValueError, match="unknown --arch"):
        choose_arch(dense, "gpt2")
    shared_softmax = TinyLMConfig(**BASE, qk_norm=True, **MOE, num_shared_experts=1, moe_scoring="softmax")
    with pytest.raises(ValueError, match="no shared experts"):
        choose_arch(shared_softmax, "qwen3_moe")
    biased = TinyLMConfig(**BASE, qk_norm=False, **MOE, moe_scoring="softmax")
    with pytest.raises(ValueError, match="expert_bias is non-zero"):
        choose_arch(biased, expert_bias_zero=False)
    from tinylm.export.interop import init_model

    with pytest.raises(ValueError, match="unknown preset"):
        init_model("no-such-preset", tmp_path / "m")


def run_cli(argv: list[str]) -> int:
    from tinylm.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_info_export_import(exported, tmp_path, capsys):
    _, _, out = exported("dots1")
    src = out.parent / "src"
    assert run_cli(["info", str(src)]) == 0
    text = capsys.readouterr().out
    assert "Dots1ForCausalLM" in text and "active per token" in text and "vocab_size" in text
    assert run_cli(["info", str(out)]) == 0  # a plain transformers dir
    text = capsys.readouterr().out
    info_src, info_out = model_info(src), model_info(out)
    assert info_src["total_params"] == info_out["total_params"] == sum(p.numel() for p in exported("dots1")[0].parameters())
    assert info_src["active_params"] == info_out["active_params"] < info_src["total_params"]
    assert run_cli(["export", str(src), "--out", str(tmp_path / "e"), "--arch", "glm4_moe"]) == 1 - 1
    assert json.loads((tmp_path / "e" / "config.json").read_text())["model_type"] == "glm4_moe"
    assert run_cli(["import", str(tmp_path / "e"), "--out", str(tmp_path / "back")]) == 0
    assert "tinylm MoE model" in capsys.readouterr().out
    model = exported("dots1")[0]
    back = tinylm.TinyLMForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.config.qk_norm and back.config.routed_scaling_factor == 2.0 and back.config.first_k_dense_replace == 1
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert max_diff(model(x).logits, back(x).logits) <= TOL


def test_export_merges_lora_adapter(exported, tmp_path):
    peft = pytest.importorskip("peft")
    model, _, out = exported("llama")
    torch.manual_seed(8)
    lora = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # non-zero update
    lora.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        expected = lora.eval()(x).logits
        assert max_diff(expected, model(x).logits) > 1e-3
    export(out.parent / "src", tmp_path / "merged", lora=str(tmp_path / "adapter"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        assert max_diff(hf(x).logits, expected) <= TOL


def test_init_preset_loadable(tmp_path, capsys):
    pytest.importorskip("tinylm.text.tokenizer")
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    assert run_cli(["init", "--list"]) == 0
    assert "tiny-moe" in capsys.readouterr().out
    assert run_cli(["init", "--preset", "tiny", "--out", str(tmp_path / "m"), "--tokenizer", str(tok_dir)]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(model, tinylm.TinyLMForCausalLM) and model.config.vocab_size == 96
    assert model.generation_config.eos_token_id == [2, 0]
    assert AutoTokenizer.from_pretrained(tmp_path / "m").eos_token == "<|im_end|>"
    # the bundled tokenizer (default): the ChatML template lives in tokenizer_config.json itself
    init_model("tiny", tmp_path / "b", num_hidden_layers=1)
    tok_cfg = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"is_local", "local_files_only", "extra_special_tokens"} & set(tok_cfg)
    assert not (tmp_path / "b" / "chat_template.jinja").exists()


@pytest.mark.parametrize("name", ["llama", "dots1"])
def test_static_cache_decoder_matches_exported_generate(exported, name):
    """tinylm's own batched StaticKVCache decoder gives the same greedy tokens as the exported model."""
    gen_mod = pytest.importorskip("tinylm.inference.generate")
    model, hf, _ = exported(name)
    prompts = [[5, 9, 17, 33, 60], [7, 8, 9]]
    params = gen_mod.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    ours = gen_mod.generate(model, tiny_tokenizer(), prompts, params)
    for p, c in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert c.token_ids == ref[0, len(p):].tolist()
