"""Generate the bundled vision-language demo data: coloured shapes with captions and Q/A.

Why generated: no image data can be downloaded here, and a VLM demo needs questions whose answers are
in the pixels only. Every image is drawn by this script with PIL from a fixed seed (no fonts, no
downloads), so `python scripts/build_vision_data.py` rebuilds the same files byte for byte in ~5 s;
nothing is committed but this code. Licence: the generated images and text are CC0 (public domain).

Images: 64x64, grey background, 1-3 shapes of one colour and kind.
  colours: red green blue yellow purple orange black white;  shapes: circle square triangle diamond star
  sizes: big / small;  positions: top left, top right, bottom left, bottom right, centre;  counts 1-3.
Half of the training images also get a greyscale copy (caption and questions without colour).
Held-out split: 40 (colour, shape, position) combinations that never occur in training (each
colour-shape pair is held out at one of the five positions): the model must name colour, shape,
size and position of a scene it has not seen. (Holding out whole colour-shape pairs is harder: a
tower trained CLIP-style on 32 pairs binds shape to colour; docs/vision.md has the numbers.)

Files (under --out, default data/vision):
  images/{train,heldout}/NNNNN.png, blank.png (background only)
  captions.jsonl   caption alignment rows  {"image", "conversations": [user "<image>\\nDescribe...", caption]}
  sft.jsonl        Q/A rows (colour, shape, size, position, count), some with two images
  heldout.jsonl    Q/A rows on held-out combinations (with "task" = colour|shape|... for scoring)
  clip_pairs.jsonl {"image", "text"} image-caption pairs for training the demo vision tower
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 1234
SIZE = 64
BACKGROUND = (128, 128, 128)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
             "bottom right": (0.73, 0.73), "centre": (0.5, 0.5)}
NUMBERS = {1: "one", 2: "two", 3: "three"}


def heldout_position(colour: str, shape: str) -> str:
    """The one position at which this colour-shape pair never appears in training (a Latin-square
    choice, so every position is held out equally often)."""
    i, j = list(COLOURS).index(colour), SHAPES.index(shape)
    return list(POSITIONS)[(i + 2 * j) % len(POSITIONS)]


# Colourless (greyscale) copies of this fraction of the training images, captioned without a colour
# word: they teach the vision tower and the VLM shape apart from colour (without them a frozen
# CLIP-trained tower ties shape to the colours it was seen with: held-out shape accuracy 5%).
GREY_FRACTION = 0.5
DESCRIBE = ("Describe the image.", "What is in the picture?", "Write a caption for this image.")
QUESTIONS = {
    "colour": ("What colour is the shape?", "What colour are the shapes?"),
    "shape": ("What shape is this?", "What shape are they?"),
    "size": ("Is the shape big or small?", "Are the shapes big or small?"),
    "position": ("Where is the shape?", None),
    "count": ("How many shapes are there?", "How many shapes are there?"),
}


def polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape of radius r centred at (cx, cy)."""
    if kind == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if kind == "star":
        return [(cx + (r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    raise ValueError(kind)


def draw(scene: dict, rng: random.Random) -> Image.Image:
    """Render a scene {colour, shape, size, position, count} (positions jittered by the rng)."""
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    fill = COLOURS[scene["colour"]]
    if scene["count"] == 1:
        r = (14 if scene["size"] == "big" else 8) + rng.uniform(-1.5, 1.5)
        fx, fy = POSITIONS[scene["position"]]
        centres = [(fx * SIZE + rng.uniform(-3, 3), fy * SIZE + rng.uniform(-3, 3))]
    else:
        r = 7 + rng.uniform(-1, 1)
        slots = rng.sample(list(POSITIONS.values()), scene["count"])
        centres = [(fx * SIZE + rng.uniform(-2, 2), fy * SIZE + rng.uniform(-2, 2)) for fx, fy in slots]
    for cx, cy in centres:
        if scene["shape"] == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon(polygon(scene["shape"], cx, cy, r), fill=fill)
    return img


def caption(s: dict) -> str:
    colour = f"{s['colour']} " if s["colour"] else ""  # "" for the colourless copies
    if s["count"] == 1:
        return f"a {s['size']} {colour}{s['shape']} in the {s['position']}."
    return f"{NUMBERS[s['count']]} small {colour}{s['shape']}s."


def clip_text(s: dict) -> str:
    """The tower's training text names only what the object is: with size and position in it, a batch
    of 64 captions can be told apart without looking at the shape, and the tower never learns shapes
    (measured: VLM shape accuracy 29% on training images). Position stays in the patch layout."""
    colour = f"{s['colour']} " if s["colour"] else ""
    return f"a {colour}{s['shape']}" if s["count"] == 1 else f"{NUMBERS[s['count']]} {colour}{s['shape']}s"


def answer(s: dict, task: str) -> str:
    return {"colour": s["colour"], "shape": s["shape"], "size": s["size"], "position": s["position"],
            "count": NUMBERS[s["count"]]}[task]


def scenes(n: int, heldout: bool, rng: random.Random) -> list[dict]:
    """n scenes balanced over the 40 colour-shape pairs. Held-out: one shape at the pair's held-out
    position; training: 1-3 shapes, a single shape never at the held-out position of its pair."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    out = []
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        count = 1 if heldout or rng.random() < 0.75 else rng.choice((2, 3))
        if count == 1:
            banned = heldout_position(colour, shape)
            position = banned if heldout else rng.choice([p for p in POSITIONS if p != banned])
        out.append({"colour": colour, "shape": shape, "count": count,
                    "size": rng.choice(("big", "small")) if count == 1 else "small",
                    "position": position if count == 1 else ""})
    return out


def qa_rows(img: str, s: dict, rng: random.Random, tasks: tuple[str, ...]) -> list[dict]:
    rows = []
    for task in tasks:
        q = QUESTIONS[task][0 if s["count"] == 1 else 1]
        if q is None or (task == "size" and s["count"] > 1):
            continue
        rows.append({"image": img, "task": task, "answer": answer(s, task), "conversations": [
            {"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": answer(s, task)}]})
    return rows


def two_image_row(a: tuple[str, dict], b: tuple[str, dict]) -> dict:
    """A two-image comparison row: "Do the two shapes have the same colour?" -> yes / no."""
    same = "yes" if a[1]["colour"] == b[1]["colour"] else "no"
    return {"image": [a[0], b[0]], "task": "compare", "answer": same, "conversations": [
        {"role": "user", "content": "<image>\n<image>\nDo the two images show the same colour?"},
        {"role": "assistant", "content": same}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def build(out: Path, n_train: int = 2400, n_heldout: int = 400, seed: int = SEED) -> dict[str, int]:
    """Write every file; returns row counts. Deterministic for a given seed."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    captions, sft, heldout, pairs = [], [], [], []
    train_imgs: list[tuple[str, dict]] = []
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(scenes(n, split == "heldout", rng)):
            rel = f"images/{split}/{i:05d}.png"
            draw(s, random.Random(f"{seed}:{i}") if split == "train" else rng).save(out / rel, optimize=True)
            if split == "train" and rng.random() < GREY_FRACTION:  # a colourless copy: shape without colour
                grey = f"images/{split}/{i:05d}_grey.png"
                draw_rng = random.Random(f"{seed}:{i}")
                draw(s, draw_rng).convert("L").convert("RGB").save(out / grey, optimize=True)
                g = dict(s, colour="")
                pairs.append({"image": grey, "text": clip_text(g)})
                captions.append({"image": grey, "conversations": [
                    {"role": "user", "content": f"<image>\n{rng.choice(DESCRIBE)}"},
                    {"role": "assistant", "content": caption(g)}]})
                sft += qa_rows(grey, g, rng, ("shape", "size", "position", "count"))
            if split == "train":
                train_imgs.append((rel, s))
                pairs.append({"image": rel, "text": clip_text(s)})
                captions.append({"image": rel, "conversations": [
                    {"role": "user", "content": f"<image>\n{rng.choice(DESCRIBE)}"},
                    {"role": "assistant", "content": caption(s)}]})
                sft += qa_rows(rel, s, rng, tuple(QUESTIONS))
            else:
                heldout += qa_rows(rel, s, rng, ("colour", "shape", "size", "position"))
    for _ in range(n_train // 8):
        sft.append(two_image_row(*rng.sample(train_imgs, 2)))
    rng.shuffle(sft)
    Image.new("RGB", (SIZE, SIZE), BACKGROUND).save(out / "blank.png")
    for name, rows in (("captions", captions), ("sft", sft), ("heldout", heldout), ("clip_pairs", pairs)):
        write_jsonl(out / f"{name}.jsonl", rows)
        counts[name] = len(rows)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/vision", help="output directory (default data/vision)")
    ap.add_argument("--train", type=int, default=2400, help="training images")
    ap.add_argument("--heldout", type=int, default=400, help="held-out images (unseen colour-shape pairs)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    counts = build(Path(args.out), args.train, args.heldout, args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v} rows" for k, v in counts.items()))


if __name__ == "__main__":
    main()
