"""Model-level behaviour: caches, padding, MoE balancing, configs, HF integration, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import tinylm
from tinylm.models.config import TinyLMConfig, count_parameters, preset_config
from tinylm.models.hf_compat import enable_checkpointing, output_cache
from tinylm.models.kv_cache import StaticKVCache

TOL = 1e-4
BASE = dict(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=32)


def make(seed: int = 0, **kw) -> tinylm.TinyLMForCausalLM:
    torch.manual_seed(seed)
    return tinylm.TinyLMForCausalLM(TinyLMConfig(**{**BASE, **kw})).eval()


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 80, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=False, **MOE)], ids=["dense", "moe"])
def test_dynamic_cache_prefill_decode_equals_full_forward(kw):
    model, x = make(**kw), ids(2, 12)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :7], use_cache=True)
        steps = [out.logits]
        for t in range(7, 12):
            out = model(x[:, t:t + 1], cache=output_cache(out), use_cache=True)
            steps.append(out.logits)
        # a multi-token chunk after the prefill also works (chunked prefill)
        chunk = model(x[:, :5], use_cache=True)
        chunk = model(x[:, 5:], cache=output_cache(chunk), use_cache=True)
    assert max_diff(torch.cat(steps, 1), full) <= TOL
    assert max_diff(chunk.logits, full[:, 5:]) <= TOL


@pytest.mark.parametrize("kw", [dict(), dict(**MOE)], ids=["dense", "moe"])
def test_static_cache_prefill_decode_equals_full_forward(kw):
    model, x = make(**kw), ids(2, 10)
    cache = StaticKVCache(model.config, batch_size=2, max_seq_len=16)
    with torch.no_grad():
        full = model(x).logits
        steps = [model(x[:, :6], cache=cache).logits]
        for t in range(6, 10):
            steps.append(model(x[:, t:t + 1], cache=cache).logits)
    assert cache.seq_lens.tolist() == [10, 10]
    assert max_diff(torch.cat(steps, 1), full) <= TOL


def test_static_cache_ragged_rows_and_reuse():
    """Rows of different lengths (right-padded new tokens, cache_rows) and a reset row match solo runs."""
    model = make()
    a, b = ids(1, 7, seed=2), ids(1, 4, seed=3)
    with torch.no_grad():
        solo_a, solo_b = model(a).logits, model(b).logits
        cache = StaticKVCache(model.config, batch_size=3, max_seq_len=16)
        batch = torch.zeros(2, 7, dtype=torch.long)
        batch[0], batch[1, :4] = a[0], b[0]
        mask = torch.zeros(2, 7, dtype=torch.long)
        mask[0], mask[1, :4] = 1, 1
        rows = torch.tensor([2, 0])
        out = model(batch, attention_mask=mask, cache=cache, cache_rows=rows).logits
        assert cache.seq_lens.tolist() == [4, 0, 7]
        assert max_diff(out[0], solo_a[0]) <= TOL and max_diff(out[1, :4], solo_b[0]) <= TOL
        # decode one more token for row 0 only; then reset row 2 and reuse it for b
        nxt = torch.tensor([[11]])
        step = model(nxt, cache=cache, cache_rows=torch.tensor([0])).logits
        ref = model(torch.cat([b, nxt], 1)).logits[:, -1:]
        assert max_diff(step, ref) <= TOL
        cache.reset([2])
        again = model(b, cache=cache, cache_rows=torch.tensor([2])).logits
        assert max_diff(again, solo_b) <= TOL


@pytest.mark.parametrize("kw", [dict(), dict(**MOE)], ids=["dense", "moe"])
def test_padded_batches_match_unpadded(kw):
    model = make(**kw)
    a, b = ids(1, 9, seed=4), ids(1, 5, seed=5)
    with torch.no_grad():
        solo_a, solo_b = model(a).logits[0], model(b).logits[0]
        # left padding: pad-aware position ids, as transformers' generate() passes them
        x = torch.zeros(2, 9, dtype=torch.long)
        x[0], x[1, 4:] = a[0], b[0]
        mask = (torch.arange(9)[None] >= torch.tensor([[0], [4]])).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        left = model(x, attention_mask=mask, position_ids=pos).logits
        assert torch.isfinite(left).all()
        assert max_diff(left[0], solo_a) <= TOL and max_diff(left[1, 4:], solo_b) <= TOL
        # right padding: default positions are already right
        x = torch.zeros(2, 9, dtype=torch.long)
        x[0], x[1, :5] = a[0], b[0]
        right = model(x, attention_mask=(x != 0).long()).logits
        assert max_diff(right[1, :5], solo_b) <= TOL


def test_loss_is_shifted_cross_entropy():
    model, x = make(), ids(2, 8)
    labels = x.clone()
    labels[0, :3] = -100
    out = model(x, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 80), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - ref.item()) <= 1e-5
    n = int((labels[:, 1:] != -100).sum())
    summed = model(x, labels=labels, num_items_in_batch=n).loss
    assert abs(summed.item() - ref.item()) <= 1e-5


def test_moe_aux_loss_present_nonzero_finite():
    model = make(**MOE, router_aux_loss_coef=0.01).train()
    x = ids(2, 16)
    out = model(x, labels=x)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0
    lm_only = F.cross_entropy(out.logits[:, :-1].reshape(-1, 80), x[:, 1:].reshape(-1))
    assert abs((out.loss - lm_only - out.aux_loss).item()) <= 1e-5
    out.loss.backward()  # the aux loss reaches the router
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert make(**MOE).eval()(x).aux_loss.item() == 0.0
    assert make().train()(x, labels=x).aux_loss.item() == 0.0  # dense: a zero tensor


def test_expert_bias_update_moves_load_toward_uniform():
    model = make(**MOE, moe_bias_update_rate=0.02, num_hidden_layers=1)
    moe = model.model.layers[0].mlp
    gate = moe.gate
    x = ids(4, 32, seed=7)
    seen = []
    hook = moe.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    d = seen[0].reshape(-1, 64).mean(0)
    with torch.no_grad():  # make experts 0 and 1 win for almost every token: a badly skewed start
        gate.weight.zero_()
        gate.weight[0] = 40 * d / d.norm()
        gate.weight[1] = 20 * d / d.norm()
        model.moe_load_stats()  # reset

    def imbalance() -> float:
        with torch.no_grad():
            model(x)
        load = torch.tensor(model.moe_load_stats()["layer_0"])
        return (load - 1 / 4).abs().sum().item()

    start = imbalance()
    assert start > 0.5
    for _ in range(30):
        with torch.no_grad():
            model(x)
        model.update_expert_bias()
    assert gate.expert_bias.abs().sum() > 0
    assert imbalance() < 0.5 * start


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="does not divide hidden_size"):
        TinyLMConfig(**{**BASE, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TinyLMConfig(**{**BASE, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rms_norm_eps must be > 0"):
        TinyLMConfig(**{**BASE, "rms_norm_eps": -1.0})
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive integer"):
        TinyLMConfig(**{**BASE, "num_hidden_layers": True})
    from tinylm.models.loading import load_model

    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_or_broken_files_are_named(tmp_path):
    """Every broken model directory gives one line naming the file, through the CLI too (exit 2)."""
    import shutil

    from tinylm.cli import main
    from tinylm.export.interop import init_model
    from tinylm.models.loading import load_model

    good = tmp_path / "good"
    init_model("tiny", good, num_hidden_layers=1, hidden_size=64, intermediate_size=128)

    def broken(name: str, edit) -> str:
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return str(d)

    cases = {
        broken("no_weights", lambda d: (d / "model.safetensors").unlink()): (FileNotFoundError, "no weights"),
        broken("bad_config", lambda d: (d / "config.json").write_text('{"model_type": "tinylm",\n  oops}')):
            (ValueError, r"config.json:2: invalid JSON"),
        broken("no_tok_json", lambda d: (d / "tokenizer.json").unlink()): (FileNotFoundError, "no tokenizer.json"),
        broken("bad_tok_cfg", lambda d: (d / "tokenizer_config.json").write_text("{")):
            (ValueError, "tokenizer_config.json:1: invalid JSON"),
        broken("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])):
            (ValueError, "truncated weights .model.safetensors"),
    }
    for path, (err, msg) in cases.items():
        with pytest.raises(err, match=msg):
            load_model(path)
    assert main(["info", str(good)]) == 0
    for path in cases:
        assert main(["chat", path, "--prompt", "hi"]) == 2, path


def test_count_parameters_matches_module():
    for kw in (dict(), dict(**MOE, first_k_dense_replace=1), dict(tie_word_embeddings=False, qk_norm=False)):
        model = make(**kw)
        total, active = count_parameters(model.config)
        assert total == sum(p.numel() for p in model.parameters())
        assert active <= total


def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = make(**MOE, tie_word_embeddings=False)
    model.model.layers[1].mlp.gate.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "tinylm"
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back, tinylm.TinyLMForCausalLM)
    assert torch.equal(back.model.layers[1].mlp.gate.expert_bias, model.model.layers[1].mlp.gate.expert_bias)
    x = ids(2, 6)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    tied = make()
    tied.save_pretrained(tmp_path / "tied")
    t2 = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert t2.lm_head.weight.data_ptr() == t2.model.embed_tokens.weight.data_ptr()


def test_transformers_static_cache_is_refused_clearly():
    model, x = make(), ids(1, 5)
    with pytest.raises(ValueError, match="own static cache"):
        model.generate(x, max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_generate_honours_length_and_eos():
    model, x = make(), ids(2, 5)
    gen = dict(do_sample=False, pad_token_id=0)
    assert model.generate(x, max_new_tokens=7, eos_token_id=None, **gen).shape == (2, 12)
    assert model.generate(x, max_length=9, eos_token_id=None, **gen).shape == (2, 9)
    free = model.generate(x[:1], max_new_tokens=6, eos_token_id=None, **gen)
    eos = int(free[0, 7])  # make the 3rd generated token the EOS: generation stops right after it
    stopped = model.generate(x[:1], max_new_tokens=6, eos_token_id=eos, **gen)
    first = (free[0, 5:] == eos).nonzero()[0].item()
    assert stopped.shape[1] == 5 + first + 1 and stopped[0, -1].item() == eos


def test_gradient_checkpointing_same_grads():
    x = ids(2, 10)
    grads = []
    for ckpt in (False, True):
        model = make(**MOE, first_k_dense_replace=1).train()
        if ckpt:
            enable_checkpointing(model)
            assert model.model.layers[0].gradient_checkpointing
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        assert max_diff(grads[0][n], grads[1][n]) <= 1e-5, n
