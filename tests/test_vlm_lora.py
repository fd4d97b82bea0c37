"""LoRA on the `vlm` stage: adapters on the LM only (never the vision tower's q_proj/k_proj/...), the
projector trained in full, everything else bit-identical after training, and the VLM saved merged so
that it reloads as a plain VLM with the logits of the adapted model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_vision import COLOURS, make_tower, qa, write_data

from tinylm.data.vision_data import collate, load_rows
from tinylm.models.loading import load_model
from tinylm.models.lora import LoRALinear, disable_lora, lora_modules
from tinylm.models.vision import build_vlm, grow_vocab, load_vision_tower, load_vlm

RECIPE = Path(__file__).parent.parent / "recipes" / "vlm_sft_lora.yaml"


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    return make_tower(tmp_path_factory.mktemp("tower"))


def cfg_for(tower: Path, data: Path, out: Path, *extra: str):
    from tinylm.training.trainconfig import load_config

    return load_config(RECIPE, ["model=tiny", f"vision.encoder={tower}", f"data.train={data}", "batch_size=4",
                                "max_steps=3", "warmup_steps=1", "log_every=1", "dtype=fp32", "vision.pool=2",
                                "lora.r=4", f"out_dir={out}", *extra])


def test_lora_trains_only_projector_and_adapters_and_saves_merged(tower, tmp_path):
    from tinylm.posttrain.vlm_train import load_vlm_for_training

    data = write_data(tmp_path, [qa(f"{c}.png", "<image>\nWhat colour?", c) for c in COLOURS] * 4)
    cfg = cfg_for(tower, data, tmp_path / "run")
    model, tok = load_vlm_for_training(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") or ".lora_" in n for n in trainable), trainable
    assert any(n.startswith("projector.norm.") for n in trainable)
    adapted = [n for n, _ in lora_modules(model)]
    assert adapted and all(n.startswith("language_model.") for n in adapted)   # the tower's q_proj is not adapted
    assert not any(isinstance(m, LoRALinear) for m in model.vision_tower.modules())

    # save merged: reloads as a plain VLM with the adapted model's logits (non-zero B: a real update)
    for _, layer in lora_modules(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    rows = load_rows(data, tok, model.settings.tokens_per_image, model.settings.image_token_id, 128)
    batch = collate(rows[:3], tok.pad_token_id, model.processor)
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model.eval()
    with torch.no_grad():
        ours = model(**kw).logits
        model.save_pretrained(tmp_path / "merged")
        tok.save_pretrained(tmp_path / "merged")
        assert any(True for _ in lora_modules(model))  # the model being trained keeps its adapters
        loaded, _ = load_vlm(tmp_path / "merged")
        assert not any(True for _ in lora_modules(loaded))
        assert torch.allclose(loaded.eval()(**kw).logits, ours, atol=1e-5)
        with disable_lora(model):
            assert not torch.allclose(model(**kw).logits, ours, atol=1e-3)  # the adapters did change the LM


def test_lora_through_the_loop_changes_only_adapted_weights(tower, tmp_path):
    from tinylm.train import train

    data = write_data(tmp_path, [qa(f"{c}.png", "<image>\nWhat colour?", c) for c in COLOURS] * 4)
    cfg = cfg_for(tower, data, tmp_path / "run", "lora.target_modules=[q_proj,v_proj]")
    train(cfg, log=lambda *a: None)
    model, _ = load_vlm(tmp_path / "run" / "final")
    lm0, _ = load_model("tiny", dtype="fp32", seed=cfg.seed)
    grow_vocab(lm0, model.language_model.config.vocab_size)
    base = lm0.state_dict()
    changed = {k for k, v in model.language_model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(k.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")) for k in changed), changed
    ref_tower = load_vision_tower(tower)[0].state_dict()
    assert all(torch.equal(v, ref_tower[k]) for k, v in model.vision_tower.state_dict().items())
    # the projector trained: it differs from the same seeded fresh one the run started from
    lm, tok = load_model("tiny", dtype="fp32", seed=cfg.seed)
    fresh = build_vlm(lm, tok, tower, pool=2, seed=cfg.seed).projector
    assert not torch.equal(fresh.linear_1.weight, model.projector.linear_1.weight)


def test_lora_with_trained_lm_layers_or_nf4_is_refused(tower, tmp_path):
    from tinylm.posttrain.vlm_train import load_vlm_for_training

    data = write_data(tmp_path, [qa("red.png")])
    with pytest.raises(ValueError, match="vision.train_lm=none"):
        load_vlm_for_training(cfg_for(tower, data, tmp_path / "a", "vision.train_lm=all"))
    with pytest.raises(ValueError, match="nf4.*not supported"):
        load_vlm_for_training(cfg_for(tower, data, tmp_path / "b", "lora.quantize=nf4"))


def test_export_refusal_says_what_to_change():
    from tinylm.export.vlm_export import refusal

    msg = refusal("runs/v", projector_norm=False, pool=2)
    assert "2x2 patch pooling (vision.pool=2)" in msg and "LayerNorm (vision" not in msg
    assert "vision.projector_norm=false vision.pool=1" in msg
    both = refusal("runs/v", projector_norm=True, pool=2)
    assert "projector LayerNorm (vision.projector_norm=true) and 2x2 patch pooling" in both
