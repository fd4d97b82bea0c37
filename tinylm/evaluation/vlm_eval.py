"""Visual question answering accuracy of a VLM: exact match after normalisation, per question type.

Each row is a vision data row (tinylm/data/vision_data.py) whose last turn is the reference answer; an
optional "task" field groups the rows (colour, shape, ...). `--blank IMG` replaces every image by
one image (e.g. the empty background): a model that uses the image then falls to the majority
baseline, which is printed beside it (the accuracy of always giving the most frequent answer).

    python -m tinylm.evaluation.vlm_eval runs/vlm_sft/final data/vision/heldout.jsonl
    python -m tinylm.evaluation.vlm_eval runs/vlm_sft/final data/vision/heldout.jsonl --blank data/vision/blank.png
"""

from __future__ import annotations

import argparse
import json
import string
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from tinylm.data.vision_data import (
    decode_image,
    encode_vlm_chat,
    parse_messages,
    place_images,
    read_image_bytes,
)
from tinylm.models.vision import VisionLM, load_vlm


def normalise(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze spaces (SQuAD-style exact match)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def read_vqa(path: str | Path, blank: bytes | None = None) -> list[dict[str, Any]]:
    """Rows {messages (without the answer), images (bytes), answer, task, where}."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        raw = json.loads(line)
        src = raw.get("image", raw.get("images"))
        srcs = [] if src is None else (src if isinstance(src, list) else [src])
        images = [blank if blank is not None else read_image_bytes(s, path.parent, where) for s in srcs]
        msgs = place_images(parse_messages(raw, where), len(images), where)
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last turn must be the assistant's reference answer")
        rows.append({"messages": msgs[:-1], "images": images, "answer": msgs[-1]["content"],
                     "task": raw.get("task", "all"), "where": where})
    return rows


@torch.no_grad()
def answer_rows(model: VisionLM, tokenizer: Any, rows: list[dict], max_new_tokens: int = 8,
                batch_size: int = 32) -> list[str]:
    """Greedy answers; prompts of equal length are batched (no padding needed)."""
    model.eval()
    tpi = model.settings.tokens_per_image
    prompts = [encode_vlm_chat(tokenizer, r["messages"], tpi, add_generation_prompt=True)[0] for r in rows]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out = [""] * len(rows)
    device = next(model.parameters()).device
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            imgs = [decode_image(b, rows[i]["where"]) for i in chunk for b in rows[i]["images"]]
            pixels = model.preprocess(imgs).to(device) if imgs else None
            gen = model.generate(ids, pixels, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id or 0)
            for i, g in zip(chunk, gen[:, ids.shape[1]:].tolist()):
                out[i] = tokenizer.decode(g, skip_special_tokens=True).strip()
    return out


def score(rows: list[dict], answers: list[str]) -> dict[str, dict[str, float]]:
    """{task: {n, accuracy, majority}} plus an "overall" entry."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r["task"]].append(i)
    groups["overall"] = list(range(len(rows)))
    table = {}
    for task, idx in groups.items():
        refs = [normalise(rows[i]["answer"]) for i in idx]
        hits = sum(normalise(answers[i]) == ref for i, ref in zip(idx, refs))
        table[task] = {"n": len(idx), "accuracy": hits / len(idx),
                       "majority": Counter(refs).most_common(1)[0][1] / len(idx)}
    return table


def evaluate_vqa(model_dir: str, data: str | None, limit: int | None = None, max_new_tokens: int = 8,
                 batch_size: int = 32) -> dict[str, Any]:
    """`tinylm eval VLM_DIR --task gen --data vqa.jsonl`: the gen task's result dict (exact match after
    normalisation) plus the per-question-type table under "by_task"."""
    if not data:
        raise ValueError("--task gen on a vision model needs --data (rows with images, e.g. data/vision/heldout.jsonl)")
    model, tok = load_vlm(model_dir)
    rows = read_vqa(data)[:limit] if limit else read_vqa(data)
    answers = answer_rows(model, tok, rows, max_new_tokens, batch_size)
    table = score(rows, answers)
    return {"task": "gen", "n": len(rows), "shots": 0, "exact_match": table["overall"]["accuracy"],
            "format_rate": 1.0, "by_task": table,
            "samples": [{"gold": r["answer"], "pred": a, "task": r["task"]} for r, a in zip(rows, answers)]}


def print_table(table: dict[str, dict[str, float]], title: str) -> None:
    print(f"{title}\n{'task':<10} {'n':>5} {'accuracy':>9} {'majority':>9}")
    for task, r in table.items():
        print(f"{task:<10} {r['n']:>5} {r['accuracy']:>9.3f} {r['majority']:>9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description="VQA exact-match accuracy of a tinylm VLM, per question type.")
    ap.add_argument("model", help="VLM directory (runs/vlm_sft/final)")
    ap.add_argument("data", help="jsonl of vision rows whose last turn is the reference answer")
    ap.add_argument("--blank", help="answer every question with this image instead (proves the image is used)")
    ap.add_argument("--limit", type=int, default=0, help="first N rows only")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    model, tokenizer = load_vlm(args.model)
    blank = Path(args.blank).read_bytes() if args.blank else None
    rows = read_vqa(args.data, blank)
    rows = rows[:args.limit] if args.limit else rows
    table = score(rows, answer_rows(model, tokenizer, rows))
    print_table(table, f"{args.model} on {args.data}" + (f" (every image = {args.blank})" if blank else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
