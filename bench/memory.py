"""Peak memory (RSS) vs speed of one tinylm `small` training run, seq 340 x batch 8, CPU.

Each configuration runs in its own subprocess (peak RSS is per process): fp32 / bf16 autocast,
with and without gradient checkpointing (recompute each decoder layer in backward: activations
of one layer instead of eight, ~1/3 more forward compute), and the unfused cross-entropy path
(full (B, T, V) fp32 logits) for comparison with the default fused chunked one.

    python bench/memory.py                # all configurations, 1 warmup + 3 timed steps each
    python bench/memory.py --steps 5 --only fp32,fp32+ckpt

One `RESULT peak_rss_<config> <MiB> MiB ratio=<rss / fp32 rss> vs=fp32` line per configuration,
plus `RESULT train_tok_s_<config> ... vs=fp32`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["fp32", "fp32+ckpt", "bf16", "bf16+ckpt", "fp32+logits_ce"]


def worker(name: str, steps: int, warmup: int, seq: int, batch: int, data: str) -> dict:
    import torch

    from tinylm.data.dataset import BatchIterator, load_token_dataset
    from tinylm.models.config import preset_config
    from tinylm.models.hf_compat import enable_checkpointing
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.training.loop_parts import accumulate_gradients, build_optimizer, finish_gradients
    from tinylm.training.metrics import peak_memory_mb
    from tinylm.training.objectives import LMObjective, causal_lm_loss_sum
    from tinylm.training.trainconfig import TrainConfig

    torch.manual_seed(0)
    model = TinyLMForCausalLM(preset_config("small")).train()
    if "ckpt" in name:
        enable_checkpointing(model)
    cfg = TrainConfig(seq_len=seq, batch_size=batch, lr=3e-4)
    it = iter(BatchIterator(load_token_dataset(data, kind="pretrain", seq_len=seq), batch, seq, seed=0))
    obj = LMObjective(cfg)
    if "logits_ce" in name:
        obj.loss = lambda m, b: causal_lm_loss_sum(m, b)[:2] + ({},)  # type: ignore[method-assign]
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name.startswith("bf16") else contextlib.nullcontext
    scale = 1.0 / (batch * seq)

    def step() -> tuple[int, float]:
        stats, _, _ = accumulate_gradients(obj, model, [next(it)], 1, torch.device("cpu"), amp, None, scale)
        finish_gradients(params, float(stats[1]), 1, scale, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(stats[2]), float(stats[0] / stats[1])

    for _ in range(warmup):
        step()
    times, tokens, loss = [], 0, 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        n, loss = step()
        times.append(time.perf_counter() - t0)
        tokens = n
    med = sorted(times)[len(times) // 2]
    return {"config": name, "tok_s": tokens / med, "step_s": med, "peak_rss_mb": peak_memory_mb(), "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq", type=int, default=340)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--data", default=str(REPO / "data/pretrain/train.jsonl"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("JSON " + json.dumps(worker(args.worker, args.steps, args.warmup, args.seq, args.batch, args.data)))
        return
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            sys.exit(f"--only: unknown configuration {n!r} (known: {', '.join(CONFIGS)})")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = {}
    for n in names:
        cmd = [sys.executable, __file__, "--worker", n, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seq", str(args.seq), "--batch", str(args.batch), "--data", args.data]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{n} failed:\n{proc.stderr[-3000:]}")
        rows[n] = r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("JSON ")][-1][5:])
        print(f"{n:15s} peak RSS {r['peak_rss_mb']:7.0f} MiB | {r['tok_s']:6.0f} tok/s | {r['step_s']:.2f} s/step | "
              f"loss {r['loss']:.3f}", flush=True)
    base = rows.get("fp32")
    for n, r in rows.items():
        ratio_m = r["peak_rss_mb"] / base["peak_rss_mb"] if base else 1.0
        ratio_t = r["tok_s"] / base["tok_s"] if base else 1.0
        print(f"RESULT peak_rss_{n} {r['peak_rss_mb']:.0f} MiB ratio={ratio_m:.2f} vs=fp32")
        print(f"RESULT train_tok_s_{n} {r['tok_s']:.0f} tok/s ratio={ratio_t:.2f} vs=fp32")


if __name__ == "__main__":
    main()
