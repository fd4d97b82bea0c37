"""The speed-ups in model.py must not change the math: hand-written backward passes are checked
against autograd of the plain formulas (gradcheck in float64), and the fused chunked lm_head +
cross-entropy against F.cross_entropy on full logits, through the trainer's LMObjective."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.config import preset_config
from tinylm.model import (
    TinyLMForCausalLM,
    _LinearCrossEntropyFn,
    _RMSNormFn,
    _RoPEFn,
    linear_cross_entropy_sum,
)
from tinylm.objectives import LMObjective, causal_lm_loss_sum
from tinylm.trainconfig import TrainConfig


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
    from tinylm.linear import Linear

    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert "_decode_weight_t" in lin.__dict__  # the fast path ran
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(torch.randn(4, 64)).square().sum().backward()  # grad path: plain F.linear
    opt.step()  # in-place update bumps the weight's version
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert "_decode_weight_t" not in lin.state_dict() and len(lin.state_dict()) == 2


def test_inference_paths_of_rmsnorm_and_rope_equal_autograd_functions():
    from tinylm.model import RMSNorm, apply_rope

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
