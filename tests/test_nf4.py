"""NF4 / QLoRA (tinylm/models/nf4.py) against bitsandbytes' NF4 (quant_type="nf4", blocksize=64, CPU tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinylm.models import nf4
from tinylm.models.lora import LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter

SHAPES = [(128, 64), (96, 200), (7, 9), (300, 1000)]


def bnb_functional():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bf

    return bf


def test_code_books_equal_bitsandbytes() -> None:
    bf = bnb_functional()
    assert torch.equal(nf4.nf4_code(), bf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code(), bf.create_dynamic_map(signed=True))


def test_code_book_properties() -> None:
    code = nf4.nf4_code()
    assert code.shape == (16,) and code[0] == -1 and code[-1] == 1 and code[7] == 0
    assert torch.all(code[1:] > code[:-1])
    # The values are N(0,1) quantiles: positive half from 8 evenly spaced probabilities in (0.5, 0.968].
    q = torch.special.ndtri(torch.tensor(0.5 + (0.9677083 - 0.5) * 5 / 8)) / torch.special.ndtri(torch.tensor(0.9677083))
    assert abs(float(code[7 + 5]) - float(q)) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_round_trip_bit_exact(shape, dtype) -> None:
    bf = bnb_functional()
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.05).to(dtype)
    q = nf4.quantize_nf4(w)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed.reshape(-1))            # same 4-bit codes, same nibble order
    assert torch.equal(q.absmax, state.absmax)                   # same block scales
    assert torch.equal(nf4.dequantize_nf4(q, dtype), bf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(96, 200), (300, 1000)])
def test_double_quant_matches_bitsandbytes(shape) -> None:
    bf = bnb_functional()
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    q = nf4.quantize_nf4(w, double_quant=True)
    packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax_offset, state.offset) and torch.equal(q.absmax_scale, state.state2.absmax)
    # Dequantising bitsandbytes' own codes with our code is bit-identical.
    theirs = nf4.NF4Weight(q.packed, state.absmax, tuple(shape), 64, state.state2.absmax, state.offset)
    assert torch.equal(nf4.dequantize_nf4(theirs), bf.dequantize_4bit(packed, state))
    # The 8-bit scale codes agree except where a scale sits within 1e-5 of a midpoint of two codes:
    # bitsandbytes' CPU kernel then takes the second-nearest code, we take the nearest.
    diff = (q.absmax != state.absmax).nonzero().reshape(-1)
    assert len(diff) <= 0.005 * q.absmax.numel()
    code = nf4.dynamic_code()
    _, scales = nf4.quantize_blocks(w, nf4.nf4_code(), 64)
    x = ((scales - q.absmax_offset) / q.absmax_scale.repeat_interleave(256)[: scales.numel()])[diff]
    ours, theirs_ = code[q.absmax[diff].long()], code[state.absmax[diff].long()]
    assert torch.all((x - ours).abs() <= (x - theirs_).abs())      # ours is the nearest code
    assert torch.all(((x - ours).abs() - (x - theirs_).abs()).abs() < 1e-5)


def test_double_quant_saves_memory_and_keeps_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 1024) * 0.02
    single, double = nf4.quantize_nf4(w), nf4.quantize_nf4(w, double_quant=True)

    def bits(q: nf4.NF4Weight) -> float:
        tensors = [q.packed, q.absmax] + ([q.absmax_scale, q.absmax_offset] if q.double_quant else [])
        return 8 * sum(t.numel() * t.element_size() for t in tensors) / w.numel()

    assert abs(bits(single) - 4.5) < 1e-6                 # 4 bits + 32/64
    assert bits(double) < 4.13                            # 4 + 8/64 + 32/(64*256) ~ 4.127 (QLoRA paper)
    err1 = (nf4.dequantize_nf4(single) - w).pow(2).mean()
    err2 = (nf4.dequantize_nf4(double) - w).pow(2).mean()
    assert err1 < 0.01 * w.pow(2).mean() and err2 < 1.01 * err1


def test_nf4_linear_forward_backward() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    q = nf4.NF4Linear(lin, double_quant=True)
    w = q.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), F.linear(x2, w, lin.bias.detach())
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    assert not any(True for _ in q.parameters())          # nothing trainable in the base layer
    assert nf4.nf4_bytes(q) < 0.15 * lin.weight.numel() * 4


def _tiny():
    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM

    torch.manual_seed(0)
    return TinyLMForCausalLM(TinyLMConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, qk_norm=True,
                                          max_position_embeddings=64)).eval()


def test_qlora_model_trains_saves_and_merges(tmp_path) -> None:
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = _tiny()(ids).logits
    model = apply_lora(_tiny(), r=4, alpha=8, quantize="nf4", double_quant=True)
    assert isinstance(model.model.layers[0].mlp.down_proj.base_layer, nf4.NF4Linear)
    assert isinstance(model.lm_head, nn.Linear)           # tied output embedding stays in full precision
    with torch.no_grad():
        q_logits = model(ids).logits
    # 4-bit base: close to the full-precision model, not identical
    assert 0 < (q_logits - ref).abs().max() < 0.1 * ref.abs().max()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params) and len(params) == 2 * 7 * 2
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
    save_adapter(model, tmp_path / "qlora", base_model_name_or_path="tiny")

    # The same adapter on a freshly quantised base reproduces the logits exactly.
    again = load_adapter(_tiny(), tmp_path / "qlora", quantize="nf4", double_quant=True)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, adapted, atol=1e-6, rtol=1e-6)
    merged = merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, nf4.NF4Linear)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_bnb_linear4bit_option_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="CUDA"):
        apply_lora(_tiny(), r=2, quantize="nf4", use_bnb=True)
