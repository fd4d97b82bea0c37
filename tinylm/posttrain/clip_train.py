"""Train a small vision tower CLIP-style on image-caption pairs, saved as a transformers CLIPVisionModel.

Why: a VLM needs a pretrained vision encoder and none can be downloaded offline, so the demo builds
one honestly: contrastive pretraining (CLIP, Radford et al. 2021) of a small ViT (Dosovitskiy et al.
2021) against a bag-of-words text encoder on the demo's captions, then the ViT alone is saved as a
real `CLIPVisionModel` directory with its `CLIPImageProcessor`. The VLM loads it through the same
code path as a downloaded openai/clip-vit-base-patch16 or SigLIP directory, and keeps it frozen.

    logits = exp(t) * norm(img_proj(ViT(image).pooled)) @ norm(txt_proj(mean word embedding)).T   (B, B)
    loss   = (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2                                (InfoNCE)

with the temperature t learned (initialised to log(1/0.07), clamped at log 100 as in the paper).
Captions repeat (many images share "a big red circle in the centre."), so in-batch duplicates are
false negatives; at this scale that only softens the loss.

    python -m tinylm.posttrain.clip_train data/vision/clip_pairs.jsonl --out runs/clip_tower
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class BagOfWords(nn.Module):
    """Text encoder: mean of word embeddings -> linear projection (enough for template captions)."""

    def __init__(self, vocab: dict[str, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.EmbeddingBag(len(vocab) + 1, dim, mode="mean")
        self.proj = nn.Linear(dim, out_dim, bias=False)

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = [torch.tensor([self.vocab.get(w, len(self.vocab)) for w in words(t)] or [len(self.vocab)]) for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.proj(self.emb(torch.cat(ids), offsets))           # (B, out_dim)


def read_pairs(path: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a jsonl of {"image", "text"} (image relative to the file)."""
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((path.parent / row["image"], str(row["text"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {{\"image\": ..., \"text\": ...}} ({e})") from None
    if not pairs:
        raise ValueError(f"{path}: no image-caption pairs")
    return pairs


def build_tower(image_size: int, patch: int, hidden: int, layers: int, heads: int) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, projection_dim=hidden)
    return CLIPVisionModel(cfg)


def train_clip(pairs_file: str | Path, out: str | Path, steps: int = 800, batch: int = 64, image_size: int = 64,
               patch: int = 16, hidden: int = 128, layers: int = 4, heads: int = 4, lr: float = 1e-3,
               seed: int = 0, log=print) -> dict[str, float]:
    """Contrastive training; writes a CLIPVisionModel + CLIPImageProcessor directory to `out`."""
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    pairs = read_pairs(Path(pairs_file))
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    pixels = processor(images=[Image.open(p).convert("RGB") for p, _ in pairs], return_tensors="pt")["pixel_values"]
    texts = [t for _, t in pairs]
    vocab = {w: i for i, w in enumerate(sorted({w for t in texts for w in words(t)}))}
    tower = build_tower(image_size, patch, hidden, layers, heads)
    img_proj = nn.Linear(hidden, hidden, bias=False)
    txt = BagOfWords(vocab, hidden, hidden)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*tower.parameters(), *img_proj.parameters(), *txt.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    t0, acc, loss = time.time(), 0.0, torch.tensor(0.0)
    for step in range(steps):
        for g in opt.param_groups:  # warmup 20 steps, cosine to 0
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randperm(len(pairs), generator=gen)[:batch]
        img = F.normalize(img_proj(tower(pixel_values=pixels[idx]).pooler_output), dim=-1)  # (B, D)
        tx = F.normalize(txt([texts[i] for i in idx.tolist()]), dim=-1)                      # (B, D)
        logits = logit_scale.clamp(max=math.log(100)).exp() * img @ tx.T                    # (B, B)
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # a prediction counts as right if it picks any caption identical to the true one
        same = torch.tensor([[texts[i] == texts[j] for j in idx.tolist()] for i in idx.tolist()])
        acc = float(same[target, logits.argmax(1)].float().mean())
        if step % 50 == 0 or step == steps - 1:
            log(f"clip step {step + 1}/{steps} | loss {loss.item():.4f} | img->text acc {acc:.3f} | "
                f"temp {1 / logit_scale.exp().item():.4f} | {time.time() - t0:.0f}s")
    out = Path(out)
    tower.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    info = {"steps": steps, "final_loss": round(loss.item(), 4), "batch_acc": round(acc, 4),
            "seconds": round(time.time() - t0, 1), "pairs": len(pairs)}
    (out / "clip_training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the demo CLIP vision tower (tinylm/posttrain/clip_train.py docstring).")
    ap.add_argument("pairs", help='jsonl of {"image": path, "text": caption}')
    ap.add_argument("--out", default="runs/clip_tower")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    info = train_clip(args.pairs, args.out, args.steps, args.batch, args.image_size, args.patch, args.hidden,
                      args.layers, lr=args.lr)
    print(f"saved CLIPVisionModel to {args.out}: {info}")


if __name__ == "__main__":
    main()
