"""Multi-token prediction (tinylm/models/mtp.py, DeepSeek-V3 §2.2): the depth-k loss is the CE of the k+1-th
next token computed from the chained modules; training only; logged per depth; dropped at export."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.models.config import TinyLMConfig
from tinylm.models.model import TinyLMForCausalLM

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=64, eos_token_id=2, pad_token_id=0)


def test_mtp_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    model = TinyLMForCausalLM(TinyLMConfig(**CFG, mtp_depth=2, mtp_weight=0.5)).train()
    x = torch.randint(0, 64, (2, 12))
    labels = x.clone()
    labels[0, 7] = -100
    out = model(x, labels=labels, use_cache=False)
    # Direct: h^0 = final hidden; depth k sees h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1}.
    h, _ = model.model(x)
    expected = []
    for k, m in enumerate(model.mtp.layers, start=1):
        n = 12 - k
        cos, sin = model.model.rope(torch.arange(n)[None], h.dtype)
        h, _ = m(h[:, :n], model.model.embed_tokens(x[:, k:]), cos, sin)
        logits = model.lm_head(m.norm(h[:, :-1]))
        expected.append(F.cross_entropy(logits.reshape(-1, 64), labels[:, k + 1:].reshape(-1), ignore_index=-100))
    assert torch.allclose(out.mtp_losses, torch.stack(expected).detach(), atol=1e-5)
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, main + 0.5 * torch.stack(expected).mean(), atol=1e-5)
    fused = model(x, labels=labels, use_cache=False, return_logits=False)
    assert torch.allclose(fused.loss, out.loss, atol=1e-5)
    fused.loss.backward()  # the shared embedding gets gradient through the MTP inputs too
    assert model.mtp.layers[1].eh_proj.weight.grad.abs().sum() > 0
    model.eval()  # evaluation: the main head only, as a model without MTP would report
    with torch.no_grad():
        ev = model(x, labels=labels, use_cache=False)
    assert ev.mtp_losses is None and torch.allclose(ev.loss, main, atol=1e-5)


def test_objective_logs_per_depth_and_export_drops_mtp(tmp_path):
    from safetensors import safe_open

    from tinylm.export.interop import export
    from tinylm.training.objectives import LMObjective

    torch.manual_seed(0)
    model = TinyLMForCausalLM(TinyLMConfig(**CFG, mtp_depth=2)).train()
    x = torch.randint(0, 64, (2, 12))
    _, n, metrics = LMObjective.loss(LMObjective.__new__(LMObjective), model, {"input_ids": x, "labels": x})
    assert {"mtp_loss_1", "mtp_loss_2"} <= set(metrics) and int(n) == 22
    model.save_pretrained(tmp_path / "m")
    assert export(tmp_path / "m", tmp_path / "out") == "qwen3"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "mtp" in k]
    back = TinyLMForCausalLM.from_pretrained(tmp_path / "m")  # kept in tinylm's own format
    assert torch.equal(back.mtp.layers[0].eh_proj.weight, model.mtp.layers[0].eh_proj.weight)
