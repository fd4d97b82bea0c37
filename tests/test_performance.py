"""The speed-ups in model.py must not change the math: hand-written backward passes are checked
against autograd of the plain formulas (gradcheck in float64), and the fused chunked lm_head +
cross-entropy against F.cross_entropy on full logits, through the trainer's LMObjective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm.models.config import preset_config
from tinylm.models.layers import _LinearCrossEntropyFn, _RMSNormFn, _RoPEFn, linear_cross_entropy_sum
from tinylm.models.model import TinyLMForCausalLM
from tinylm.training.objectives import LMObjective, causal_lm_loss_sum
from tinylm.training.trainconfig import TrainConfig


def test_rmsnorm_and_rope_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, dtype=torch.double, requires_grad=True)
    w = torch.randn(8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-6), (x, w))
    half = torch.randn(1, 1, 4, 4, dtype=torch.double)
    cos, sin = half.cos().repeat(1, 1, 1, 2), half.sin().repeat(1, 1, 1, 2)
    assert torch.autograd.gradcheck(lambda x: _RoPEFn.apply(x, cos, sin), (x,))
    x1, x2 = x.chunk(2, dim=-1)
    ref = x * cos + torch.cat((-x2, x1), dim=-1) * sin  # Llama's rotate_half formula
    torch.testing.assert_close(_RoPEFn.apply(x, cos, sin), ref)


def test_rmsnorm_bf16_input_matches_llama_formula() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(16)
    ref = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = _RMSNormFn.apply(x, w, 1e-6)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref)


def test_linear_cross_entropy_gradcheck_and_value() -> None:
    torch.manual_seed(0)
    h = torch.randn(300, 16, dtype=torch.double, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 50, (300,))
    y[::7] = -100
    assert torch.autograd.gradcheck(lambda h, w: _LinearCrossEntropyFn.apply(h, w, y, 128, True), (h, w))
    ref = F.cross_entropy(h @ w.T, y, reduction="sum", ignore_index=-100)
    torch.testing.assert_close(linear_cross_entropy_sum(h, w, y), ref)


def test_fused_loss_equals_logits_loss_in_trainer_objective() -> None:
    torch.manual_seed(0)
    model = TinyLMForCausalLM(preset_config("tiny", num_hidden_layers=2)).train()
    ids = torch.randint(0, 6400, (2, 40))
    labels = ids.clone()
    labels[0, :7] = -100  # SFT-style masked prompt
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    params = list(model.parameters())
    ce_ref, n_ref, _ = causal_lm_loss_sum(model, batch)
    g_ref = torch.autograd.grad(ce_ref, params)
    ce, n, _ = LMObjective(TrainConfig()).loss(model, batch)  # takes the fused path for tinylm
    g = torch.autograd.grad(ce, params)
    assert int(n) == int(n_ref)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)  # summed loss: fp32 rounding
    assert model(ids, labels=labels, return_logits=False).logits is None


def test_decode_linear_matches_f_linear_and_tracks_weight_updates():
    from tinylm.models.linear import Linear

    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert "_decode_weight" in lin.__dict__  # the fast path ran
    for opt in (torch.optim.SGD(lin.parameters(), lr=0.5),  # in-place update bumps the weight's version
                torch.optim.AdamW(lin.parameters(), lr=0.5, fused=True)):  # fused kernels do not
        lin(torch.randn(4, 64)).square().sum().backward()  # grad path: plain F.linear
        opt.step()
        opt.zero_grad()
        with torch.inference_mode():
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert "_decode_weight" not in lin.state_dict() and len(lin.state_dict()) == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_products_split_k_and_fused_equal_f_linear(threads):
    from tinylm.models.linear import Linear, fused_decode
    from tinylm.models.lora import apply_lora
    from tinylm.models.moe import SwiGLU

    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layers = (Linear(256, 96, bias=False), Linear(256, 64, bias=False), Linear(256, 64, bias=False))
        for rows in (1, 4, 32):
            x = torch.randn(rows, 1, 256)
            with torch.inference_mode():
                outs = fused_decode(x, layers)
                assert outs is not None and [o.shape[-1] for o in outs] == [96, 64, 64]
                for out, layer in zip(outs, layers):
                    torch.testing.assert_close(out, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        split = layers[0].__dict__["_decode_weight"][1]
        assert split.shape == ((threads, 256 // threads, 96) if threads > 1 else (1, 256, 96))
        with torch.inference_mode():
            assert fused_decode(torch.randn(33, 256), layers) is None  # prefill-sized: MKL's own path
        assert fused_decode(torch.randn(1, 256), layers) is None  # grad enabled: training path
        handle = layers[1].register_forward_hook(lambda *a: None)
        with torch.inference_mode():
            assert fused_decode(torch.randn(1, 256), layers) is None  # hooks must see their call
        handle.remove()
        mlp = SwiGLU(64, 128)
        apply_lora(mlp, r=4, alpha=8, target_modules=["gate_proj", "up_proj"])
        with torch.inference_mode():  # wrapped layers take the per-layer path (and still decode right)
            assert fused_decode(torch.randn(1, 64), (mlp.gate_proj, mlp.up_proj)) is None
    finally:
        torch.set_num_threads(before)


def test_decode_layout_follows_thread_count():
    from tinylm.models.linear import Linear

    lin = Linear(128, 32, bias=False)
    x = torch.randn(1, 128)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            lin(x)
            assert lin.__dict__["_decode_weight"][1].shape[0] == 2
            torch.set_num_threads(1)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
            assert lin.__dict__["_decode_weight"][1].shape[0] == 1
    finally:
        torch.set_num_threads(before)


def test_inference_paths_of_rmsnorm_and_rope_equal_autograd_functions():
    from tinylm.models.model import RMSNorm, apply_rope

    torch.manual_seed(0)
    norm = RMSNorm(8)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8)
    half = torch.randn(1, 1, 3, 4)
    cos, sin = half.cos().repeat(1, 1, 1, 2), half.sin().repeat(1, 1, 1, 2)
    q = torch.randn(2, 2, 3, 8)
    with torch.no_grad():
        fast_norm, fast_rope = norm(x), apply_rope(q, cos, sin)
    torch.testing.assert_close(fast_norm, norm(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(fast_rope, _RoPEFn.apply(q, cos, sin), rtol=0, atol=0)
