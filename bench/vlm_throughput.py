"""VLM training throughput and image-encode time, each beside its text-only baseline in the same run.

    python bench/vlm_throughput.py [--tower runs/clip_tower] [--steps 6]

RESULT lines (the machine is shared, so compare ratios, not absolute numbers; note `uptime`):
  vlm_train_tokens_per_s   VLM train step (tower frozen, projector + LM trained) on image Q/A batches
                           vs  the same LM trained on text-only batches of the same shape
  vlm_image_encode_ms      preprocess + tower + projector per image (batch 32)
                           vs  the LM's forward per image-token block (what those tokens cost inside the LM)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def tiny_tower(path: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=128, intermediate_size=256,
                                     num_hidden_layers=4, num_attention_heads=4)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(path)
    return path


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main() -> None:
    from tinylm.models.loading import load_model
    from tinylm.models.vision import build_vlm
    from tinylm.posttrain.vlm_train import set_trainable, supervised_ce

    ap = argparse.ArgumentParser()
    ap.add_argument("--tower", default="runs/clip_tower", help="vision tower dir (a random tiny CLIP if absent)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    tower = Path(args.tower)
    if not (tower / "config.json").exists():
        tower = tiny_tower(Path(tempfile.mkdtemp()) / "tower")
    lm, tok = load_model("tiny", dtype="fp32", seed=0)
    model = build_vlm(lm, tok, tower)
    set_trainable(model, "all", False)
    n = model.settings.tokens_per_image
    b, t = args.batch, n + 24
    ids = torch.randint(10, 6000, (b, t))
    ids[:, 2:2 + n] = model.settings.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    images = [Image.new("RGB", (64, 64), (i * 7 % 255, 80, 160)) for i in range(b)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    text_ids = ids.clone()
    text_ids[:, 2:2 + n] = 300

    def step(with_images: bool) -> None:
        batch = {"input_ids": ids if with_images else text_ids, "labels": labels,
                 "attention_mask": torch.ones_like(ids),
                 "pixel_values": model.preprocess(images) if with_images else None}
        loss, k, _ = supervised_ce(model, model.language_model, batch, (labels[:, 1:] != -100).sum())
        (loss / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    vlm_s = timed(lambda: step(True), args.steps)
    txt_s = timed(lambda: step(False), args.steps)
    load = os.getloadavg()[0]
    print(f"RESULT vlm_train_tokens_per_s {b * t / vlm_s:.0f} tok/s ratio={txt_s / vlm_s:.3f} vs=text_only_same_shape"
          f" (load {load:.1f}, {n} image tokens of {t})")
    model.eval()
    with torch.no_grad():
        enc_s = timed(lambda: model.encode_images(model.preprocess(images * 2)), args.steps) / (2 * b)
        lm_s = timed(lambda: model.language_model.model(text_ids[:, :n]), args.steps) / b
    print(f"RESULT vlm_image_encode_ms {1000 * enc_s:.2f} ms/image ratio={enc_s / lm_s:.3f} "
          f"vs=lm_forward_per_{n}_token_block (load {load:.1f})")


if __name__ == "__main__":
    main()
