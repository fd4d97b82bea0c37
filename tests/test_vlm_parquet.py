"""Parquet VLM rows as MiniMind-V ships them (conversations as JSON text + image_bytes), and as
Hugging Face `datasets` writes them (list-of-struct turns + Image structs): same rows as jsonl, and
bad rows named by file:row or counted and skipped."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_vision import COLOURS, make_tower, qa, write_data

from tinylm.data.vision_data import collate, load_rows
from tinylm.models.loading import load_model
from tinylm.models.vision import build_vlm


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    lm, tok = load_model("tiny", dtype="fp32", seed=0)
    return build_vlm(lm, tok, make_tower(tmp_path_factory.mktemp("tower")), pool=2), tok


def png(rgb: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="JPEG" if size == 8 else "PNG")
    return buf.getvalue()


def minimind_table(rows: list[tuple[list[dict], bytes | list[bytes]]]) -> pa.Table:
    """MiniMind-V's schema: conversations: string (JSON), image_bytes: binary (or list<binary>)."""
    images = [r[1] for r in rows]
    typ = pa.list_(pa.binary()) if any(isinstance(x, list) for x in images) else pa.binary()
    return pa.table({"conversations": pa.array([json.dumps(r[0], ensure_ascii=False) for r in rows], pa.string()),
                     "image_bytes": pa.array(images, typ)})


def turns(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_minimind_parquet_equals_jsonl(vlm, tmp_path):
    model, tok = vlm
    s = model.settings
    black = png((0, 0, 0), size=8)  # MiniMind-V's placeholder image on text-only (t2t) rows
    table = minimind_table([(turns("<image>\nWhat colour?", "red"), png(COLOURS["red"])),
                            (turns("Which colour is it?<image>", "blue"), png(COLOURS["blue"])),
                            (turns("Hello", "hi"), black)])
    pq.write_table(table, tmp_path / "sft_i2t.parquet", row_group_size=2)  # rows span two row groups
    got = load_rows(tmp_path / "sft_i2t.parquet", tok, s.tokens_per_image, s.image_token_id, 128)
    path = write_data(tmp_path, [qa("red.png"), qa("blue.png", "Which colour is it?<image>", "blue"),
                                 qa(None, "Hello", "hi")])
    ref = load_rows(path, tok, s.tokens_per_image, s.image_token_id, 128)
    assert [r.ids for r in got] == [r.ids for r in ref] and [r.mask for r in got] == [r.mask for r in ref]
    assert [len(r.images) for r in got] == [1, 1, 0]  # the t2t row's black placeholder is not an image
    assert got[2].where.endswith("sft_i2t.parquet:row 2")
    a = collate(got, tok.pad_token_id, model.processor)
    b = collate(ref, tok.pad_token_id, model.processor)
    assert a["pixel_values"].shape == (2, 3, 32, 32)
    for k in ("input_ids", "labels", "attention_mask", "pixel_values"):
        assert a[k].equal(b[k]), k


def test_datasets_style_parquet_multi_image_and_paths(vlm, tmp_path):
    model, tok = vlm
    s = model.settings
    write_data(tmp_path, [])  # red.png / blue.png / green.png next to the parquet file
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "messages": [turns("<image>\n<image>\nSame colour?", "no"), turns("<image>\nWhat colour?", "green")],
        "images": pa.array([[{"bytes": png(COLOURS["red"]), "path": None}, {"bytes": None, "path": "blue.png"}],
                            [{"bytes": None, "path": "green.png"}]], pa.list_(struct)),
    })
    pq.write_table(table, tmp_path / "hf.parquet")
    rows = load_rows(tmp_path / "hf.parquet", tok, s.tokens_per_image, s.image_token_id, 128)
    assert [len(r.images) for r in rows] == [2, 1]
    assert rows[0].images[1] == (tmp_path / "blue.png").read_bytes()
    assert rows[0].ids.count(s.image_token_id) == 2 * s.tokens_per_image


def test_bad_parquet_rows_name_file_and_row(vlm, tmp_path):
    model, tok = vlm
    s = model.settings
    args = (tok, s.tokens_per_image, s.image_token_id, 128)
    good = (turns("<image>\nWhat colour?", "red"), png(COLOURS["red"]))
    table = pa.table({"conversations": pa.array([json.dumps(good[0]), "[{\"role\": ", json.dumps(good[0]),
                                                 json.dumps(turns("<image><image>two?", "x"))]),
                      "image_bytes": pa.array([good[1], good[1], b"not an image", good[1]], pa.binary())})
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"bad.parquet:row 1: column 'conversations': invalid JSON"):
        load_rows(path, *args)
    logs: list[str] = []
    rows = load_rows(path, *args, skip_invalid=True, log=logs.append)
    assert len(rows) == 1 and rows[0].where.endswith(":row 0")
    assert "skipped 3 invalid row(s)" in logs[0]
    pq.write_table(table.slice(2, 1), path)
    with pytest.raises(ValueError, match=r"bad.parquet:row 0: not a readable image"):
        load_rows(path, *args)
    pq.write_table(table.slice(3, 1), path)
    with pytest.raises(ValueError, match=r"bad.parquet:row 0: 2 <image> placeholder\(s\) but 1 image"):
        load_rows(path, *args)
    pq.write_table(pa.table({"text": ["hello"]}), path)
    with pytest.raises(ValueError, match=r"bad.parquet: no 'conversations' .*columns are \['text'\]"):
        load_rows(path, *args)
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable parquet file"):
        load_rows(path, *args)
