"""Export a tinylm VLM to transformers' own `LlavaForConditionalGeneration` (Liu et al. 2023).

    python -m tinylm.export.vlm_export runs/vlm_sft/final --out runs/vlm_llava

What maps one to one:
  language_model/  -> tinylm's text export (tinylm/export/interop.py: Llama / Qwen3 / ... weights), which
                      becomes `model.language_model` + `lm_head`;
  vision_tower/    -> `model.vision_tower` (the same CLIP / SigLIP class), `vision_feature_layer` =
                      feature_layer, `vision_feature_select_strategy` = "default" (drop CLS) or "full";
  projector        -> `model.multi_modal_projector` (linear_1, GELU, linear_2);
  <|image_pad|>    -> `image_token_index`, `image_seq_length` = tokens per image.
What does not: LLaVA's projector has no LayerNorm and no patch pooling, so a VLM trained with
`vision.projector_norm=true` or `vision.pool>1` is refused with that reason and what to change (`refusal`);
no other transformers VLM class matches those exactly either (checked in transformers 5.x, see `refusal`).
The tokenizer and the tower's image processor are copied, so `LlavaProcessor`-free use is:
input_ids with image_seq_length image tokens per image + pixel_values from the image processor.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from tinylm.models.vision import load_vlm


def export_llava(vlm_dir: str | Path, out: str | Path) -> Path:
    """Write a LlavaForConditionalGeneration directory; returns its path."""
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from tinylm.export.interop import export

    model, tok = load_vlm(vlm_dir)
    s = model.settings
    if s.projector_norm or s.pool != 1:
        raise ValueError(refusal(vlm_dir, s.projector_norm, s.pool))
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        export(Path(vlm_dir) / "language_model", Path(tmp) / "text")
        text = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "text"), dtype=torch.float32)
    tcfg = text.config
    cfg = LlavaConfig(vision_config=model.vision_tower.config.to_dict(), text_config=tcfg.to_dict(),
                      image_token_index=s.image_token_id, image_seq_length=s.tokens_per_image,
                      projector_hidden_act="gelu", vision_feature_layer=s.feature_layer,
                      vision_feature_select_strategy="default" if s.drop_cls else "full",
                      multimodal_projector_bias=True, tie_word_embeddings=bool(tcfg.tie_word_embeddings))
    llava = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        _load(llava.model.vision_tower, model.vision_tower.state_dict(), "vision tower")
        proj = {k: v for k, v in model.projector.state_dict().items() if not k.startswith("norm.")}
        _load(llava.model.multi_modal_projector, proj, "projector")
        _load(llava.model.language_model, text.model.state_dict(), "language model")
        llava.lm_head.weight.copy_(text.lm_head.weight)
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    model.processor.save_pretrained(str(out))
    src_gen = Path(vlm_dir) / "language_model" / "generation_config.json"
    if src_gen.exists():
        shutil.copy(src_gen, out / "generation_config.json")
    return out


def refusal(vlm_dir: str | Path, projector_norm: bool, pool: int) -> str:
    """Why a VLM cannot become a transformers class, and what to change. No transformers VLM class has our
    projector with its LayerNorm or average pooling in front of a CLIP/SigLIP tower: InternVL's projector is
    LayerNorm + Linear-GELU-Linear but InternVLConfig forces its own InternVLVisionModel (no CLIP pre-LayerNorm);
    Gemma3 pools, then RMSNorm + one matrix; Qwen2-VL / Idefics3 / SmolVLM / InternVL merge patches by
    concatenation (pixel shuffle), not averaging (docs/vision.md)."""
    what = [x for x, bad in (("the projector LayerNorm (vision.projector_norm=true)", projector_norm),
                             (f"{pool}x{pool} patch pooling (vision.pool={pool})", pool != 1)) if bad]
    return (f"{vlm_dir}: cannot export to transformers: LlavaForConditionalGeneration's projector is Linear-GELU-Linear "
            f"on every patch, and this VLM uses {' and '.join(what)}, which no transformers VLM class with a CLIP/SigLIP "
            "tower has. To export, train both stages again with vision.projector_norm=false vision.pool=1 (the VLM "
            "itself works as it is in tinylm chat / serve / eval; docs/vision.md, 'Export to transformers')")


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k and "inv_freq" not in k]
    if missing or unexpected:
        raise ValueError(f"export: the {what} does not map onto LLaVA: missing {missing[:4]}, unexpected {unexpected[:4]}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Export a tinylm VLM to transformers' LlavaForConditionalGeneration.")
    ap.add_argument("model", help="VLM directory")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args()
    print(f"wrote {export_llava(args.model, args.out)} (LlavaForConditionalGeneration)")


if __name__ == "__main__":
    main()
