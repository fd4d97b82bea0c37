"""LoRA (tinylm/models/lora.py) against PEFT, the reference implementation users trust.

The HF base for PEFT is a transformers LlamaForCausalLM holding the same weights as our tinylm
model (module names match Llama), so equal logits mean equal adapters, scaling and key names.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tinylm.models.config import TinyLMConfig
from tinylm.models.hf_compat import enable_checkpointing
from tinylm.models.lora import (
    LoRALinear,
    apply_lora,
    disable_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from tinylm.models.model import TinyLMForCausalLM

peft = pytest.importorskip("peft")

CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, qk_norm=False, tie_word_embeddings=True,
           rope_theta=10000.0, rms_norm_eps=1e-6)


def tiny_model(seed: int = 0, **kw) -> TinyLMForCausalLM:
    torch.manual_seed(seed)
    return TinyLMForCausalLM(TinyLMConfig(**{**CFG, **kw})).eval()


def llama_copy(model: TinyLMForCausalLM):
    """transformers LlamaForCausalLM with the tinylm model's weights (our base for PEFT)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                      max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    hf = LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero (a no-op adapter); make it non-zero so the tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


IDS = torch.tensor([[5, 17, 3, 44, 90, 12, 7, 1], [60, 2, 33, 8, 71, 19, 4, 50]])


def test_apply_lora_targets_and_trainable() -> None:
    model = apply_lora(tiny_model(), r=4, alpha=8)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    # all 7 projections per layer, including the non-square k/v (GQA) and MLP ones
    assert len(wrapped) == 2 * 7
    assert any(n.endswith("mlp.down_proj") for n in wrapped) and any(n.endswith("self_attn.k_proj") for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    n_train, n_total = trainable_parameters(model)
    per_layer = sum(4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    assert n_train == per_layer < n_total
    # B = 0 at init: the adapted model is exactly the base model
    base = tiny_model()
    assert torch.equal(model(IDS).logits, base(IDS).logits)
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_lora(tiny_model(), target_modules=["nope_proj"])


def test_peft_loads_our_adapter_and_we_load_peft(tmp_path) -> None:
    model = apply_lora(tiny_model(), r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"])
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny-test")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["bias"] == "none" and cfg["base_model_name_or_path"] == "tiny-test"
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    hf = llama_copy(tiny_model())
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    ours = model(IDS).logits
    ref = peft_model(input_ids=IDS).logits
    assert (ours - tiny_model()(IDS).logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    # An adapter trained by PEFT (a few SGD steps on the HF base) loads into tinylm with equal logits.
    hf2 = llama_copy(tiny_model())
    pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf2, pcfg)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = pm(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ours2 = load_adapter(tiny_model(), tmp_path / "peft")
    torch.testing.assert_close(ours2(IDS).logits, pm(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_merge_equals_adapter_and_disable(tmp_path) -> None:
    model = apply_lora(tiny_model(), r=4, alpha=16)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDS).logits
        with disable_lora(model):
            base = model(IDS).logits
    torch.testing.assert_close(base, tiny_model()(IDS).logits, atol=0, rtol=0)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(merged(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
    # the merged model saves/loads as a plain HF model
    merged.save_pretrained(str(tmp_path / "merged"))
    again = TinyLMForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(again(IDS).logits, adapted, atol=1e-5, rtol=1e-5)


def test_load_adapter_for_other_base_names_the_key(tmp_path) -> None:
    model = apply_lora(tiny_model(), r=4)
    save_adapter(model, tmp_path / "a")
    other = tiny_model(hidden_size=32, intermediate_size=48)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.lora_A\.weight has shape \(4, 96\), model expects \(4, 48\)"):
        load_adapter(other, tmp_path / "a")
    deeper = apply_lora(tiny_model(num_hidden_layers=3), r=4)
    save_adapter(deeper, tmp_path / "b")
    with pytest.raises(ValueError, match=r"for .model\.layers\.2\.mlp\.down_proj. but the model has no linear layer"):
        load_adapter(tiny_model(), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model(), tmp_path)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_adapters(reentrant: bool) -> None:
    labels = IDS.clone()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = apply_lora(tiny_model(), r=4, alpha=8, init="gaussian")
        randomize_adapters(model)
        model.train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant=reentrant)
        model(IDS, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt) and len(plain) == 28
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


def test_lora_on_moe_shared_experts() -> None:
    model = apply_lora(tiny_model(num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                                  moe_intermediate_size=32), r=2)
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert any("shared_experts.down_proj" in n for n in names)
    assert not any(n.endswith("mlp.gate") for n in names)  # the router is not a projection


def test_export_merge_lora_gives_adapter_logits(tmp_path) -> None:
    """`tinylm export MODEL --merge-lora ADAPTER`: a plain transformers model equal to base + adapter."""
    from transformers import AutoModelForCausalLM

    from tinylm.export.interop import export

    tiny_model().save_pretrained(str(tmp_path / "base"))
    model = apply_lora(tiny_model(), r=4, alpha=8)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    export(tmp_path / "base", tmp_path / "out", lora=str(tmp_path / "adapter"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert "lora" not in "".join(hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_adapter_for_another_base_warns_in_chat_and_serve_loading(tmp_path, capsys, monkeypatch) -> None:
    """Same shapes, other weights: `chat/serve --lora` (load_for_inference -> load_adapter) warns."""
    from tinylm.inference.chat import load_for_inference
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    for name, seed in (("a", 0), ("b", 1), ("SmolLM2-135M-Instruct", 0)):
        tiny_model(seed, vocab_size=len(tok)).save_pretrained(str(tmp_path / name))
        tok.save_pretrained(str(tmp_path / name))
    model = apply_lora(tiny_model(0, vocab_size=len(tok)), r=4, alpha=8)
    monkeypatch.chdir(tmp_path)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path="a")  # relative, as `model: runs/x/final`
    save_adapter(model, tmp_path / "ad_hub", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    capsys.readouterr()
    load_for_inference(str(tmp_path / "a"), lora=str(tmp_path / "ad"), device="cpu")
    load_for_inference(str(tmp_path / "SmolLM2-135M-Instruct"), lora=str(tmp_path / "ad_hub"), device="cpu")
    assert "warning" not in capsys.readouterr().err  # same base (resolved path; hub id ~ same-named dir)
    load_for_inference(str(tmp_path / "b"), lora=str(tmp_path / "ad"), device="cpu")
    err = capsys.readouterr().err
    assert "warning:" in err and "trained on base 'a'" in err and str(tmp_path / "b") in err


def test_size_summary_counts_nf4_weights() -> None:
    from tinylm.models.lora import size_summary
    from tinylm.models.nf4 import nf4_bytes

    big = dict(hidden_size=256, intermediate_size=512)
    plain = apply_lora(tiny_model(**big), r=4)
    q = apply_lora(tiny_model(**big), r=4, quantize="nf4")
    n_lora, _ = trainable_parameters(plain)
    total = sum(p.numel() for p in tiny_model(**big).parameters()) + n_lora
    assert f"{n_lora / 1e6:.2f}M trainable / {total / 1e6:.2f}M params" in size_summary(plain)
    assert "NF4" not in size_summary(plain)
    assert f"/ {total / 1e6:.2f}M params" in size_summary(q)  # 4-bit weights (buffers) still counted
    assert f"NF4 weights {nf4_bytes(q) / 1e6:.1f} MB" in size_summary(q)
