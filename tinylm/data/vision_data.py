"""Vision-language data: LLaVA / MiniMind-V conversation rows with images -> token ids, masks, pixels.

Row format (jsonl; image paths relative to the jsonl file):

    {"image": "a.png" | ["a.png", "b.png"],
     "conversations": [{"role": "user", "content": "<image>\\nWhat colour is the shape?"},
                       {"role": "assistant", "content": "red"}]}

`messages` is accepted for `conversations`, and LLaVA's {"from": "human"|"gpt", "value"} turns too.
Each `<image>` in a user (or system) message is one image, in order; a row with images but no
`<image>` gets them in front of its first user message (LLaVA's convention). Rows without images
are text-only rows and mix freely with image rows in a batch.

Tokens: each `<image>` becomes `tokens_per_image` copies of the added control token `<|image_pad|>`
through the chat-template path (tinylm/text/chat_format.py with that one string allowed), so the loss mask
is the usual assistant-only mask and image positions never carry a loss. A message that already
contains the string `<|image_pad|>` is rejected: only `<image>` can make image tokens, so text can
never forge or miscount them.

Images: bytes are read and decoded once when the file is loaded (a missing, unreadable or non-image
file is an error naming file:line, or a counted skip with `data.skip_invalid`), kept as encoded
bytes, and decoded + run through the vision tower's own image processor per batch.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from tinylm.models.vision import IMAGE_PAD, PLACEHOLDER

ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class VLMRow:
    ids: list[int]          # token ids, image-pad blocks included
    mask: list[int]         # 1 = assistant token (has a loss)
    images: list[bytes]     # encoded image files, in order of their <image> placeholders
    where: str              # "file:line", for error messages


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded bytes -> RGB PIL image, or a ValueError naming `where`."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable image ({e})") from None


def read_image_bytes(src: Any, base: Path, where: str) -> bytes:
    """An image reference (path relative to `base`, raw bytes, or {"bytes": ...}) -> checked encoded bytes."""
    if isinstance(src, dict) and "bytes" in src:
        src = src["bytes"]
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
        decode_image(data, where)
        return data
    if not isinstance(src, str) or not src:
        raise ValueError(f"{where}: field 'image' must be a path or a list of paths, got {src!r}")
    path = base / src
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{where}: image {src!r}: {e.strerror or e} ({path})") from None
    decode_image(data, f"{where}: image {src!r}")
    return data


def parse_messages(row: dict, where: str) -> list[dict]:
    """conversations / messages (OpenAI or LLaVA turn keys) -> [{"role", "content"}]."""
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        role = ROLES.get(str(t.get("role", t.get("from", ""))) if isinstance(t, dict) else "")
        content = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if role is None or not isinstance(content, str):
            raise ValueError(f"{where}: conversations[{i}] needs a role (user/assistant/system) and text content")
        if IMAGE_PAD in content:
            raise ValueError(f"{where}: conversations[{i}] contains the reserved string {IMAGE_PAD}; "
                             f"write {PLACEHOLDER} where an image goes")
        out.append({"role": role, "content": content})
    return out


def place_images(messages: list[dict], n_images: int, where: str) -> list[dict]:
    """Check that the `<image>` placeholders match the images; add them to the first user turn if absent."""
    n_marks = sum(m["content"].count(PLACEHOLDER) for m in messages if m["role"] != "assistant")
    if n_marks == 0 and n_images:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise ValueError(f"{where}: images given but no user turn to put them in")
        messages = [dict(m) for m in messages]
        messages[first]["content"] = (PLACEHOLDER + "\n") * n_images + messages[first]["content"]
    elif n_marks != n_images:
        raise ValueError(f"{where}: {n_marks} {PLACEHOLDER} placeholder(s) but {n_images} image(s)")
    return messages


def encode_vlm_chat(tokenizer: Any, messages: list[dict], tokens_per_image: int,
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) with every `<image>` of user/system turns expanded to image-pad tokens.
    add_generation_prompt: ids of a prompt ending with the assistant header (inference; mask all 0)."""
    from tinylm.text.chat_format import encode_chat

    block = IMAGE_PAD * tokens_per_image
    expanded = [dict(m, content=m["content"].replace(PLACEHOLDER, block)) if m["role"] != "assistant" else m
                for m in messages]
    allow = frozenset({IMAGE_PAD})
    if not add_generation_prompt:
        return encode_chat(tokenizer, expanded, allow=allow)
    from tinylm.text.chat_format import (
        _render_with_literals,  # the prompt path of render_prompt, with `allow`
    )
    from tinylm.text.special_tokens import encode_marked

    text, _, literals = _render_with_literals(tokenizer, expanded, True, allow)
    ids = list(encode_marked(tokenizer, text, literals)[0])
    return ids, [0] * len(ids)


def load_rows(path: str | Path, tokenizer: Any, tokens_per_image: int, image_token_id: int, seq_len: int,
              skip_invalid: bool = False, log: Any = print) -> list[VLMRow]:
    """Every row of a .jsonl (or MiniMind-V .parquet) file, checked and tokenized. Bad rows raise (or are
    counted and skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    if path.suffix == ".parquet":  # MiniMind-V's shipping format (tinylm/data/vision_parquet.py)
        from tinylm.data.vision_parquet import parquet_records

        records = parquet_records(path)
    else:
        records = _jsonl_records(path)
    rows, skipped, first_error = [], 0, ""
    for where, read in records:
        try:
            rows.append(row_from_dict(read(), path.parent, where, tokenizer, tokens_per_image, image_token_id,
                                      seq_len))
        except ValueError as e:
            if not skip_invalid:
                raise
            skipped += 1
            first_error = first_error or str(e)
    if skipped:
        log(f"{path}: skipped {skipped} invalid row(s) (data.skip_invalid); first: {first_error}")
    if not rows:
        raise ValueError(f"{path}: no usable rows")
    return rows


def _jsonl_records(path: Path) -> Iterator[tuple[str, Callable[[], dict]]]:
    """(where, read) per non-empty line; `read()` parses the line's JSON object or raises naming it."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield f"{path}:{n}", partial(parse_json_object, line, f"{path}:{n}")


def parse_json_object(line: str, where: str) -> dict:
    """One jsonl line that must hold a JSON object; errors name `where` (file:line)."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return raw


def row_from_dict(raw: dict, base: Path, where: str, tokenizer: Any, tpi: int, image_id: int, seq_len: int) -> VLMRow:
    """One parsed row ({"image"/"images", "conversations"/"messages"}) -> checked, tokenized VLMRow."""
    src = raw.get("image", raw.get("images"))
    srcs = [] if src is None else (src if isinstance(src, list) else [src])
    images = [read_image_bytes(s, base, where) for s in srcs]
    messages = place_images(parse_messages(raw, where), len(images), where)
    ids, mask = encode_vlm_chat(tokenizer, messages, tpi)
    n_img = sum(1 for i in ids if i == image_id)
    if n_img != len(images) * tpi:  # only <image> can make these (parse_messages rejects the string)
        raise ValueError(f"{where}: {n_img} image tokens for {len(images)} image(s) x {tpi}")
    if len(ids) > seq_len:
        if image_id in ids[seq_len:]:
            raise ValueError(f"{where}: {len(ids)} tokens (with {tpi} per image) exceed seq_len={seq_len} "
                             "and truncation would cut an image; raise seq_len or vision.pool")
        ids, mask = ids[:seq_len], mask[:seq_len]
    return VLMRow(ids, mask, images, where)


def collate(rows: list[VLMRow], pad_id: int, processor: Any) -> dict[str, Any]:
    """Right-padded input_ids / labels (-100 off the assistant mask) / attention_mask (B, T), and
    pixel_values (N_images, 3, S, S) in row-major order of the image blocks (None if no image)."""
    t = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), t), dtype=torch.long)
    images = []
    for b, r in enumerate(rows):
        ids[b, :len(r.ids)] = torch.tensor(r.ids)
        m = torch.tensor(r.mask, dtype=torch.bool)
        labels[b, :len(r.ids)] = torch.where(m, torch.tensor(r.ids), -100)
        attn[b, :len(r.ids)] = 1
        images += [decode_image(x, r.where) for x in r.images]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"] if images else None
    return {"input_ids": ids, "labels": labels, "attention_mask": attn, "pixel_values": pixels}


class VLMBatches:
    """Endless shuffled batches (a new permutation per epoch), this rank's share; resumable by
    `state_dict()` = {"epoch", "pos"}. len() = batches per epoch."""

    def __init__(self, rows: list[VLMRow], batch_size: int, pad_id: int, processor: Any, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.rows, self.batch_size, self.pad_id, self.processor = rows, batch_size, pad_id, processor
        self.seed, self.rank, self.world = seed, rank, world_size
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.rows) / (self.batch_size * self.world)))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def __iter__(self) -> VLMBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        gb = self.batch_size * self.world
        if self.pos + gb > len(self.rows) and self.pos > 0:
            self.epoch, self.pos = self.epoch + 1, 0
            return next(self)
        take = order[self.pos:self.pos + gb].tolist()[self.rank::self.world] or order[:1].tolist()
        self.pos += gb
        return collate([self.rows[i] for i in take], self.pad_id, self.processor)


def one_pass(rows: list[VLMRow], batch_size: int, pad_id: int, processor: Any, rank: int = 0,
             world_size: int = 1) -> Any:
    """Every row once, in order (validation)."""
    gb = batch_size * world_size
    for start in range(0, len(rows) - world_size + 1, gb):
        take = list(range(start, min(start + gb, len(rows))))[rank::world_size]
        yield collate([rows[i] for i in take], pad_id, processor)
