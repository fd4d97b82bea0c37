"""Vision-language rows from parquet, as MiniMind-V ships them (`pretrain_i2t.parquet`, `sft_i2t.parquet`).

MiniMind-V's layout (its README, "dataset format"): two columns,

    conversations   string: JSON text of [{"role": "user", "content": "<image>\\nDescribe..."}, {"role": "assistant", ...}]
    image_bytes     binary: the encoded JPEG (or a list of them for several images)

Text-only rows keep an 8x8 black placeholder in `image_bytes` and have no `<image>` in their text; the
image is then unused (MiniMind-V only replaces image-pad tokens). So a parquet row whose turns contain
no `<image>` is read as a text row and its image column is ignored, unlike a jsonl row, whose images
are put in front of the first user turn (LLaVA's convention, tinylm/data/vision_data.py).

Also accepted, for parquet written by Hugging Face `datasets`: a `messages` column instead of
`conversations`, the turns as a list of structs instead of JSON text, and an `images` / `image` column
of `datasets.Image` structs ({"bytes", "path"}; a path is relative to the parquet file).

Errors name the file and the 0-based row (`sft_i2t.parquet:row 17: ...`, the index pyarrow's
`table.slice(17, 1)` and pandas' `iloc[17]` use); `data.skip_invalid=true` skips and counts bad rows
instead. Rows are read one record batch at a time, so a multi-GB file is never held twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from tinylm.models.vision import PLACEHOLDER

CONVERSATION_COLUMNS = ("conversations", "messages")
IMAGE_COLUMNS = ("image_bytes", "images", "image")   # MiniMind-V first, then datasets' Image feature
READ_BATCH = 256                                      # rows decoded from parquet at a time


def parquet_records(path: Path) -> Iterator[tuple[str, Callable[[], dict]]]:
    """(where, read) per row of a .parquet file; `read()` gives the row as a jsonl-style dict
    ({"conversations", "image"}) or raises ValueError naming the row. `vision_data.load_rows` tokenizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    conv = next((c for c in CONVERSATION_COLUMNS if c in names), None)
    if conv is None:
        raise ValueError(f"{path}: no 'conversations' (or 'messages') column; columns are {names}")
    img = next((c for c in IMAGE_COLUMNS if c in names), None)
    n = 0
    try:
        batches = pf.iter_batches(batch_size=READ_BATCH, columns=[conv] + ([img] if img else []))
        for batch in batches:
            for rec in batch.to_pylist():
                where = f"{path}:row {n}"
                n += 1
                yield where, partial(_raw, rec, conv, img, where)
    except (pa.ArrowException, OSError) as e:  # a damaged file: rows after `n` cannot be read
        raise ValueError(f"{path}: parquet read failed after row {n} ({e})") from None


def _raw(rec: dict, conv: str, img: str | None, where: str) -> dict:
    """A row with no `<image>` in its user/system turns is a text row: MiniMind-V's placeholder image
    (8x8 black) in its image column is not used."""
    turns = _turns(rec[conv], conv, where)
    turns_ = turns if isinstance(turns, list) else []  # a bad shape is reported by vision_data.parse_messages
    texts = [t.get("content", t.get("value")) for t in turns_
             if isinstance(t, dict) and t.get("role", t.get("from")) not in ("assistant", "gpt")]
    if not any(isinstance(t, str) and PLACEHOLDER in t for t in texts):
        return {"conversations": turns}
    return {"conversations": turns, "image": _images(rec.get(img) if img else None)}


def _turns(value: Any, column: str, where: str) -> Any:
    """The conversations cell: JSON text (MiniMind-V) or a list of structs (datasets)."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: column '{column}': invalid JSON ({e.msg})") from None
    return value


def _images(value: Any) -> list[Any]:
    """The image cell -> a list of bytes / paths; a datasets Image struct gives its bytes, else its path."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for x in items:
        if isinstance(x, dict) and x.get("bytes") is None and x.get("path"):
            x = x["path"]
        out.append(x)
    return out
