"""`tinylm generate --model VLM_DIR --prompts p.jsonl --out o.jsonl [--image a.png ...]`: batch answers with images.

The VLM branch of `tinylm generate` (tinylm/inference/chat.py): the same prompt rows, plus images, in
the training data format (tinylm/data/vision_data.py), so the output is visual SFT data as it is:

    {"prompt": "What colour is the shape?", "image": "images/a.png"}
    {"messages": [{"role": "user", "content": "<image>\\n<image>\\nSame colour?"}], "image": ["a.png", "b.png"]}
    {"prompt": "Hello"}                                   (text only: mixes with the image rows)

Image paths in rows are relative to the prompts file; `--image PATH` (repeatable) attaches images to
every row, in front of the row's own. A row with images and no `<image>` gets them in front of its first
user message (LLaVA's convention). Rows are answered together by the engine's batcher
(tinylm/inference/vlm_engine.py), image and text rows in the same batch. Output rows:
`{"image": [paths relative to the output file], "messages": [..., {"role": "assistant", ...}]}`.
A missing or unreadable image stops with `p.jsonl:3: image 'x.png': ...` before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image

from tinylm.data.vision_data import (
    decode_image,
    parse_json_object,
    parse_messages,
    place_images,
    read_image_bytes,
)


def read_image_prompts(path: str, images: list[str], system: str | None = None,
                       ) -> list[tuple[list[dict], list[str], list[Image.Image]]]:
    """(messages without the last assistant turn, image paths, decoded images) for each row of `path`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: prompt file not found")
    extra = [(str(Path(p).resolve()), decode_image(read_image_bytes(p, Path.cwd(), f"--image {p}"), f"--image {p}"))
             for p in images]
    base, rows = Path(path).resolve().parent, []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        raw = parse_json_object(line, where)
        if isinstance(raw.get("prompt"), str):
            raw = {**raw, "messages": [{"role": "user", "content": raw["prompt"]}]}
        msgs = parse_messages(raw, where)
        if msgs[-1]["role"] == "assistant":  # the model writes its own answer
            msgs = msgs[:-1]
        if not msgs:
            raise ValueError(f"{where}: no prompt before the assistant turn")
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        src = raw.get("image", raw.get("images"))
        srcs = [] if src is None else (src if isinstance(src, list) else [src])
        own = [(str(base / s) if isinstance(s, str) else "", decode_image(read_image_bytes(s, base, where), where))
               for s in srcs]
        pairs = extra + own
        rows.append((place_images(msgs, len(pairs), where), [p for p, _ in pairs], [im for _, im in pairs]))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def generate_vlm_cmd(args: argparse.Namespace) -> int:
    """The VLM branch of `tinylm generate` (args from tinylm/inference/chat.py's parser)."""
    from tinylm.inference.generate import SamplingParams
    from tinylm.inference.vlm_engine import generate_vlm, load_vlm_for_inference

    params = SamplingParams.from_args(args)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.draft:
        raise ValueError("--draft: speculative decoding is not supported for vision-language models yet")
    rows = read_image_prompts(args.prompts, args.image or [], args.system)
    model, tok = load_vlm_for_inference(args.model, args.lora, args.dtype, args.device, quantize=args.quantize)
    out_dir = Path(args.out).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp, n_done = args.out + ".tmp", 0
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(rows), args.chunk):  # chunks keep memory bounded and show progress
            chunk = rows[start:start + args.chunk]
            answers = [generate_vlm(model, tok, [(m, ims) for m, _, ims in chunk],
                                    replace(params, seed=None if params.seed is None else params.seed + k),
                                    max_batch=args.batch_size) for k in range(args.n)]  # choice k uses seed + k
            for j, (msgs, paths, _) in enumerate(chunk):
                for outs in answers:
                    answer = {"role": "assistant", "content": outs[j].text}
                    if outs[j].reasoning and args.keep_thinking:
                        answer["reasoning_content"] = outs[j].reasoning
                    row = {"image": [os.path.relpath(p, out_dir) for p in paths]} if paths else {}
                    f.write(json.dumps({**row, "messages": msgs + [answer]}, ensure_ascii=False) + "\n")
            n_done += len(chunk) * args.n
            print(f"{n_done}/{len(rows) * args.n} answers", file=sys.stderr)
    os.replace(tmp, args.out)
    print(f"wrote {n_done} rows to {args.out}")
    return 0
