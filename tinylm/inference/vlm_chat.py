"""`tinylm chat VLM_DIR --image PATH`: talk about images in the terminal.

An image given with --image (repeatable) or `/image PATH` inside the chat is attached to the next
user message as an `<image>` placeholder, exactly like a training row (tinylm/data/vision_data.py); the
whole conversation, with all its images in order, is re-encoded every turn. Answers are decoded by
transformers' generate on the language model (the image-pad token is never sampled).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from tinylm.data.vision_data import decode_image, encode_vlm_chat
from tinylm.models.vision import PLACEHOLDER, VisionLM, load_vlm


def read_image(path: str) -> bytes:
    """Image file -> checked bytes, or a ValueError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"--image {path}: {e.strerror or e}") from None
    decode_image(data, f"--image {path}")
    return data


def reply(model: VisionLM, tok: Any, messages: list[dict], images: list[bytes], max_new_tokens: int = 64,
          temperature: float = 0.0, top_p: float = 0.9) -> str:
    """The assistant's next message for a conversation whose `<image>` placeholders match `images`."""
    ids, _ = encode_vlm_chat(tok, messages, model.settings.tokens_per_image, add_generation_prompt=True)
    x = torch.tensor([ids])
    pixels = model.preprocess([decode_image(b, "image") for b in images]) if images else None
    sample = temperature > 0
    out = model.generate(x, pixels, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=sample, temperature=temperature if sample else None,
                         top_p=top_p if sample else None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id or 0)
    return tok.decode(out[0, x.shape[1]:].tolist(), skip_special_tokens=True).strip()


def chat_vlm(args: argparse.Namespace) -> int:
    """The VLM branch of `tinylm chat` (args from tinylm/inference/chat.py's parser)."""
    model, tok = load_vlm(args.model_dir)
    model.eval()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    pending = [read_image(p) for p in (args.image or [])]
    images: list[bytes] = []
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def turn(text: str) -> None:
        nonlocal pending
        messages.append({"role": "user", "content": (PLACEHOLDER + "\n") * len(pending) + text})
        images.extend(pending)
        pending = []
        answer = reply(model, tok, messages, images, args.max_new_tokens, args.temperature, args.top_p)
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)

    if args.prompt is not None:
        turn(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"tinylm chat: {args.model_dir} (vision). Commands: /image PATH, /reset, /exit.")
    while True:
        try:
            line = input(">>> " if interactive else "").strip()
        except EOFError:
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages, images, pending = messages[:1] if args.system else [], [], []
        elif line.startswith("/image "):
            try:
                pending.append(read_image(line[len("/image "):].strip()))
                print(f"(image attached to your next message: {len(pending)})")
            except ValueError as e:
                print(f"error: {e}")
        elif line:
            turn(line)
