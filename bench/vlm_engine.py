"""The inference engine with images: each number beside its text-only baseline, measured in the same run.

    OMP_NUM_THREADS=1 python bench/vlm_engine.py [--tower runs/clip_tower] [--requests 8] [--tokens 64]
    OMP_NUM_THREADS=1 python bench/vlm_engine.py --model runs/vlm_sft/final --vqa data/vision/heldout.jsonl

RESULT lines (the machine is shared, so compare ratios, not absolute numbers; note `uptime`):
  vlm_engine_text_tokens_per_s   text-only requests through a VLM's engine (VisionBatchGenerator)
                                 vs  the same requests on the bare LM (BatchGenerator): the text path's cost
  vlm_engine_image_tokens_per_s  requests with one image each, all in one batch (prefill + decode)
                                 vs  text-only requests with prompts of the same length
  vlm_engine_vqa_rows_per_s      (--model/--vqa: a trained VLM) greedy answers to every VQA row through the
                                 engine vs  tinylm/evaluation/vlm_eval.answer_rows (transformers' generate,
                                 equal-length prompts batched); also prints whether the answers are identical
Rounds alternate between the two sides of each pair (best of --rounds), so load changes hit both.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def best_times(fns: list, rounds: int) -> list[float]:
    """Best wall time of each fn over `rounds`, the fns alternating within each round (after a warm-up)."""
    best = [float("inf")] * len(fns)
    for r in range(rounds + 1):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if r:  # round 0 warms up
                best[i] = min(best[i], time.perf_counter() - t)
    return best


def main() -> None:
    from vlm_throughput import tiny_tower

    from tinylm.inference.generate import SamplingParams, generate
    from tinylm.inference.vlm_engine import generate_vlm
    from tinylm.models.loading import load_model
    from tinylm.models.vision import PLACEHOLDER, build_vlm

    ap = argparse.ArgumentParser()
    ap.add_argument("--tower", default="runs/clip_tower", help="vision tower dir (a random tiny CLIP if absent)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default=None, help="a trained VLM directory (with --vqa)")
    ap.add_argument("--vqa", default=None, help="VQA jsonl (e.g. data/vision/heldout.jsonl)")
    args = ap.parse_args()
    if args.model:
        return vqa(args.model, args.vqa, args.rounds)
    torch.manual_seed(0)
    tower = Path(args.tower)
    if not (tower / "config.json").exists():
        tower = tiny_tower(Path(tempfile.mkdtemp()) / "tower")
    lm, tok = load_model("tiny", dtype="fp32", seed=0)
    model = build_vlm(lm, tok, tower).eval()
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
    n, tpi = args.requests, model.settings.tokens_per_image
    question = "What colour is the shape in the picture?"
    images = [Image.new("RGB", (64, 64), (30 * i % 256, 80, 200)) for i in range(n)]
    with_image = [([{"role": "user", "content": f"{PLACEHOLDER}\n{question}"}], [im]) for im in images]
    # same prompt length: the image block's tokens as words ("x" is one token)
    padded = [{"role": "user", "content": "x " * (tpi - 1) + "x\n" + question}]
    text = [(padded, []) for _ in range(n)]
    generated = n * args.tokens

    def on_lm() -> None:
        generate(model.language_model, tok, [m for m, _ in text], params, max_batch=n, chat=True)

    def on_vlm(requests) -> None:
        generate_vlm(model, tok, requests, params, max_batch=n)

    with torch.inference_mode():
        bare, vlm_text, vlm_image = best_times([on_lm, lambda: on_vlm(text), lambda: on_vlm(with_image)], args.rounds)
    load = os.getloadavg()[0]
    print(f"# {n} requests x {args.tokens} new tokens, {tpi} image tokens per image, load average {load:.1f}")
    print(f"RESULT vlm_engine_text_tokens_per_s {generated / vlm_text:.0f} tok/s ratio={bare / vlm_text:.3f} "
          f"vs=bare_lm_same_requests")
    print(f"RESULT vlm_engine_image_tokens_per_s {generated / vlm_image:.0f} tok/s ratio={vlm_text / vlm_image:.3f} "
          f"vs=text_prompts_same_length")


def vqa(model_dir: str, path: str, rounds: int) -> None:
    from tinylm.data.vision_data import decode_image
    from tinylm.evaluation.vlm_eval import answer_rows, read_vqa
    from tinylm.inference.generate import SamplingParams
    from tinylm.inference.vlm_engine import generate_vlm
    from tinylm.models.vision import load_vlm

    model, tok = load_vlm(model_dir)
    model.eval()
    rows = read_vqa(path)
    requests = [(r["messages"], [decode_image(b, r["where"]) for b in r["images"]]) for r in rows]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    got: dict[str, list[str]] = {}

    def engine() -> None:
        got["engine"] = [c.text.strip() for c in generate_vlm(model, tok, requests, params, max_batch=32)]

    def reference() -> None:
        got["reference"] = answer_rows(model, tok, rows, max_new_tokens=8, batch_size=32)

    with torch.inference_mode():
        ours, theirs = best_times([engine, reference], rounds)
    same = sum(a == b for a, b in zip(got["engine"], got["reference"]))
    print(f"# {len(rows)} rows of {path}, {same}/{len(rows)} answers identical, load average {os.getloadavg()[0]:.1f}")
    print(f"RESULT vlm_engine_vqa_rows_per_s {len(rows) / ours:.0f} rows/s ratio={theirs / ours:.3f} "
          f"vs=vlm_eval_answer_rows")


if __name__ == "__main__":
    main()
