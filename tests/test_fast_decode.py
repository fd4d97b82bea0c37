"""The lean CPU decode step (tinylm/inference/fast_decode.py) against the readable forward (model.py).

The reference is the model's own forward with the same StaticKVCache: logits within fp32 summation
noise, identical greedy tokens, identical cache contents; weight-only int8 within quantisation noise
of the float logits and greedy-identical on a trained model.
"""

from __future__ import annotations

import pytest
import torch

from tinylm.inference import fast_decode
from tinylm.inference.generate import SamplingParams, StaticRunner, generate
from tinylm.models.config import TinyLMConfig
from tinylm.models.kv_cache import StaticKVCache
from tinylm.models.model import TinyLMForCausalLM
from tinylm.text.tokenizer import load_tokenizer

SHAPE = dict(vocab_size=6400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, pad_token_id=0)
STORY = ("Once upon a time a small robot lived in a lighthouse. Every night it counted the ships, "
         "wrote their names in a blue book and sang to the sea until morning came.")


def model_for(seed: int = 0, **overrides) -> TinyLMForCausalLM:
    torch.manual_seed(seed)
    model = TinyLMForCausalLM(TinyLMConfig(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():  # norms away from 1 so that a wrongly applied norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def trained() -> TinyLMForCausalLM:
    """A tiny model that memorised STORY (a few seconds), so greedy decoding has clear margins."""
    torch.manual_seed(0)
    ids = torch.tensor([load_tokenizer()(STORY, add_special_tokens=False)["input_ids"]])
    model = TinyLMForCausalLM(TinyLMConfig(**{**SHAPE, "qk_norm": True}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3, f"did not memorise the story (loss {loss.item():.2f})"
    return model.eval()


def prefilled(model, lens: list[int]) -> tuple[StaticKVCache, StaticKVCache]:
    """Two identical caches whose rows hold random prompts of the given lengths."""
    dtype = next(model.parameters()).dtype
    caches = StaticKVCache(model.config, len(lens), 48, dtype=dtype), StaticKVCache(model.config, len(lens), 48, dtype=dtype)
    with torch.inference_mode():
        for row, n in enumerate(lens):
            ids = torch.randint(3, SHAPE["vocab_size"], (1, n))
            for cache in caches:
                model(ids, cache=cache, cache_rows=torch.tensor([row]), logits_to_keep=1)
    return caches


@pytest.mark.parametrize("overrides", [dict(qk_norm=True), dict(qk_norm=False), dict(num_key_value_heads=4),
                                       dict(yarn_factor=2.0, max_position_embeddings=64)])
def test_step_matches_reference_forward(overrides):
    model = model_for(**overrides)
    ref_cache, fast_cache = prefilled(model, [5, 9, 7])
    step = fast_decode.FastDecoder(model)
    with torch.inference_mode():
        # all rows at different lengths, a subset out of order, a single row, then all rows again
        for rows in ([0, 1, 2], [2, 0], [1], [0, 1, 2]):
            tokens, rows_t = torch.randint(3, SHAPE["vocab_size"], (len(rows),)), torch.tensor(rows)
            ref = model(tokens[:, None], cache=ref_cache, cache_rows=rows_t, logits_to_keep=1).logits[:, -1]
            torch.testing.assert_close(step(fast_cache, tokens, rows_t), ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(ref_cache.seq_lens, fast_cache.seq_lens)
    for a, b in zip(ref_cache.keys + ref_cache.values, fast_cache.keys + fast_cache.values):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_same_length_rows_take_the_view_path():
    model = model_for(1)
    ref_cache, fast_cache = prefilled(model, [6, 6])
    step = fast_decode.FastDecoder(model)
    with torch.inference_mode():
        for _ in range(3):
            tokens, rows = torch.randint(3, SHAPE["vocab_size"], (2,)), torch.tensor([0, 1])
            ref = model(tokens[:, None], cache=ref_cache, cache_rows=rows, logits_to_keep=1).logits[:, -1]
            torch.testing.assert_close(step(fast_cache, tokens, rows), ref, atol=2e-5, rtol=1e-5)


def test_generate_greedy_identical_with_and_without_fast_path(trained, monkeypatch):
    tok = load_tokenizer()
    prompts = [tok(STORY[:40])["input_ids"], tok(STORY[60:80])["input_ids"], tok("Every night")["input_ids"]]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    monkeypatch.setenv("TINYLM_FAST_DECODE", "0")
    ref = [c.token_ids for c in generate(trained, tok, prompts, params, max_batch=2)]
    monkeypatch.setenv("TINYLM_FAST_DECODE", "1")
    fast = [c.token_ids for c in generate(trained, tok, prompts, params, max_batch=2)]
    assert fast == ref
    # the memorised continuation, so the comparison is not between two streams of noise
    assert tok.decode(ref[0][:8]) in STORY


def test_int8_close_to_float_and_greedy_identical(trained):
    tok = load_tokenizer()
    prompt = tok(STORY[:40])["input_ids"]
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    ref = generate(trained, tok, [prompt], params)[0].token_ids
    fast_decode.set_quantization(trained, "int8")
    try:
        assert generate(trained, tok, [prompt], params)[0].token_ids == ref
        # 2 rows: bf16 activations; 4 rows: activations quantised too (torch._int_mm)
        for lens in ([5, 8], [5, 8, 6, 7]):
            ref_cache, q_cache = prefilled(trained, lens)
            with torch.inference_mode():
                tokens, rows = torch.arange(40, 40 + len(lens)), torch.arange(len(lens))
                ref_logits = trained(tokens[:, None], cache=ref_cache, cache_rows=rows, logits_to_keep=1).logits[:, -1]
                q_logits = fast_decode.FastDecoder(trained)(q_cache, tokens, rows)
            err = (q_logits - ref_logits).abs().max() / ref_logits.abs().max()
            assert 0 < err < 0.03, f"int8 logits off by {err:.4f} of the logit range ({len(lens)} rows)"
            assert torch.equal(q_logits.argmax(-1), ref_logits.argmax(-1))
        prepared = fast_decode.prepare(trained)
        assert prepared.layers[0].qkv.w.dtype == torch.int8 and prepared.lm_head.w.dtype == torch.int8
    finally:
        fast_decode.set_quantization(trained, None)


def test_weights_changed_in_place_are_picked_up():
    model = model_for(2)
    step = fast_decode.FastDecoder(model)
    _, cache = prefilled(model, [4])
    with torch.inference_mode():
        step(cache, torch.tensor([7]), torch.tensor([0]))
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(2)  # bumps the version counter
        step.refresh()  # what StaticRunner.prefill does before each new request
        ref_cache, cache = prefilled(model, [4])
        ref = model(torch.tensor([[7]]), cache=ref_cache, logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(step(cache, torch.tensor([7]), torch.tensor([0])), ref, atol=2e-5, rtol=1e-5)


def test_runner_uses_fast_path_only_where_it_is_exact(monkeypatch):
    assert StaticRunner(model_for(), 1, 16).fast is not None
    assert fast_decode.supports(model_for(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    monkeypatch.setenv("TINYLM_FAST_DECODE", "0")
    assert StaticRunner(model_for(), 1, 16).fast is None
    model = model_for()
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: None)
    assert "hooks" in fast_decode.supports(model)


def test_bad_quantize_value_names_the_choices():
    with pytest.raises(ValueError, match="none, int8"):
        fast_decode.set_quantization(model_for(), "int4")


def test_cli_quantize_int8_generates_and_refuses_moe(trained, tmp_path, capsys):
    from tinylm.cli import main

    tok = load_tokenizer()
    trained.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Once upon a time a small robot"}\n')
    for q in ("none", "int8"):
        main(["generate", "--model", str(tmp_path / "m"), "--prompts", str(prompts), "--out", str(tmp_path / f"{q}.jsonl"),
              "--temperature", "0", "--max-new-tokens", "12", "--quantize", q, "--device", "cpu"])
    out = (tmp_path / "none.jsonl").read_text()
    assert '"assistant", "content": "' in out and out == (tmp_path / "int8.jsonl").read_text()  # chat-wrapped prompt
    moe = model_for(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    with pytest.raises(ValueError, match="--quantize int8: not available.*MoE"):
        fast_decode.require_quantizable(moe, "int8")


def test_mla_models_decode_through_the_forward():
    try:
        model = model_for(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                          qk_norm=False)
    except (TypeError, ValueError) as e:  # an install without MLA
        pytest.skip(f"no MLA attention here: {e}")
    assert "attention class" in fast_decode.supports(model)
    assert StaticRunner(model, 1, 16).fast is None


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_bf16_model_one_and_several_rows(quantize):
    model = model_for(3).to(torch.bfloat16)
    fast_decode.set_quantization(model, quantize)
    ref_cache, fast_cache = prefilled(model, [5, 6, 7, 8])
    step = fast_decode.FastDecoder(model)
    with torch.inference_mode():
        for rows in ([0], [0, 1, 2, 3]):
            tokens, rows_t = torch.arange(50, 50 + len(rows)), torch.tensor(rows)
            ref = model(tokens[:, None], cache=ref_cache, cache_rows=rows_t, logits_to_keep=1).logits[:, -1]
            out = step(fast_cache, tokens, rows_t)
            assert out.dtype == torch.float32
            assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
