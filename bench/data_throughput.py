"""Tokenization throughput of `tinylm data prepare` with 1 and 2 worker processes.

Input: data/pretrain/train.jsonl (bundled), repeated to >= --min-mb so timings are stable;
falls back to generated text when the file is missing. Tokenizer: the bundled one.

    python bench/data_throughput.py [--min-mb 12] [--workers 2]

Prints `RESULT data_tokenize_mb_s <MB/s with N workers> MB/s ratio=<N-worker/1-worker> vs=1-worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time

from tinylm.data.prepare import get_tokenizer, prepare


def make_input(path: str, min_mb: float) -> None:
    src = "data/pretrain/train.jsonl"
    if os.path.isfile(src):
        lines = open(src, encoding="utf-8").read().splitlines()
    else:
        rng = random.Random(0)
        words = "the model learns to predict the next token from small stories and 你好 世界 数据".split()
        lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(300))}, ensure_ascii=False)
                 for _ in range(2000)]
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while n < min_mb * 1e6:
            for line in lines:
                f.write(line + "\n")
                n += len(line.encode()) + 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-mb", type=float, default=12.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    tok = get_tokenizer(None)
    with tempfile.TemporaryDirectory() as d:
        inp = os.path.join(d, "pretrain.jsonl")
        make_input(inp, args.min_mb)
        mb = os.path.getsize(inp) / 1e6
        res = {}
        for w in (1, args.workers):
            c0 = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
            meta = prepare([inp], os.path.join(d, f"out{w}"), "pretrain", tok, seq_len=args.seq_len, workers=w)
            cpu = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - c0
            meta["mb_per_cpu_s"] = mb / cpu  # load-independent efficiency (all processes)
            res[w] = meta
        same = all(open(os.path.join(d, f"out{w}", "tokens.bin"), "rb").read()
                   == open(os.path.join(d, "out1", "tokens.bin"), "rb").read() for w in res)
    one, many = res[1]["throughput_mb_s"], res[args.workers]["throughput_mb_s"]
    print(f"1 worker: {one:.2f} MB/s ({res[1]['tokens_per_s']:,.0f} tokens/s); {args.workers} workers: "
          f"{many:.2f} MB/s ({res[args.workers]['tokens_per_s']:,.0f} tokens/s); identical output: {same}; "
          f"MB per CPU-second: {res[1]['mb_per_cpu_s']:.2f} / {res[args.workers]['mb_per_cpu_s']:.2f}; "
          f"cores: {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")
    print(f"RESULT data_tokenize_mb_s {many:.2f} MB/s ratio={many / one:.2f} vs=1-worker")


if __name__ == "__main__":
    main()
