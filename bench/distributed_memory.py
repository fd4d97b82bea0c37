"""Per-rank memory of `tinylm train` under ddp / zero1 / fsdp (ZeRO-2-like and ZeRO-3), 2 gloo ranks, CPU.

Each mode is a real `torchrun --nproc_per_node 2 -m tinylm train` run of the `base` preset (a few
steps, seq 32 x batch 1: the state, not the activations, is what differs). The trainer logs, after
its first optimizer step, every rank's parameter + gradient + AdamW-state bytes (the local shards)
and peak RSS (`memory_per_rank` in metrics.jsonl); this script prints them side by side:

    python bench/distributed_memory.py                  # base, all modes
    python bench/distributed_memory.py --model small --modes ddp,fsdp
    python bench/distributed_memory.py --modes ddp,deepspeed_zero1,deepspeed_zero2,deepspeed_zero3  # pip install deepspeed

One `RESULT state_bytes_<mode> <MiB> MiB ratio=<x> vs=ddp` line (rank 0's param+grad+optimizer
bytes) and one `RESULT peak_rss_<mode> <MiB> MiB ratio=<x> vs=ddp` line (the larger rank) per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"ddp": ["parallel=ddp"], "zero1": ["parallel=zero1"],
         "fsdp_zero2": ["parallel=fsdp", "fsdp.reshard_after_forward=false"],
         "fsdp_zero3": ["parallel=fsdp", "fsdp.reshard_after_forward=true"]}
DS_MODES = {f"deepspeed_zero{k}": ["parallel=deepspeed", f"deepspeed.stage={k}"] for k in (1, 2, 3)}


def write_text(path: Path, rows: int = 400) -> None:
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran in the park and birds sang songs all day".split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")


def run_mode(name: str, model: str, steps: int, work: Path) -> list[dict]:
    out = work / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tinylm", "train", str(REPO / "recipes" / "pretrain.yaml"), f"model={model}",
           f"data.train={work / 'text.jsonl'}", "data.val=", "seq_len=32", "batch_size=1", "grad_accum=1",
           f"max_steps={steps}", "warmup_steps=1", "eval_every=0", "save_every=0", "log_every=1",
           "dtype=fp32", "compile=false", "sample_prompts=[]", f"out_dir={out}", *{**MODES, **DS_MODES}[name]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TINYLM_CACHE": str(work / "cache")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    mem = next(r["memory_per_rank"] for r in rows if "memory_per_rank" in r)
    shutil.rmtree(out, ignore_errors=True)  # base checkpoints are GBs
    return mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="tinylm_dist_mem_"))
    try:
        write_text(work / "text.jsonl")
        results = {}
        for name in args.modes.split(","):
            results[name] = run_mode(name, args.model, args.steps, work)
            for rank, m in enumerate(results[name]):
                print(f"{name} rank {rank}: params {m['param_bytes'] / 2**20:.1f} MiB, grads "
                      f"{m['grad_bytes'] / 2**20:.1f} MiB, optimizer {m['optim_bytes'] / 2**20:.1f} MiB, "
                      f"peak RSS {m['peak_rss_mb']:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def state(m: dict) -> float:
        return (m["param_bytes"] + m["grad_bytes"] + m["optim_bytes"]) / 2**20

    base_state = state(results["ddp"][0]) if "ddp" in results else None
    base_rss = max(m["peak_rss_mb"] for m in results["ddp"]) if "ddp" in results else None
    for name, mem in results.items():
        s, rss = state(mem[0]), max(m["peak_rss_mb"] for m in mem)
        print(f"RESULT state_bytes_{args.model}_{name} {s:.1f} MiB"
              + (f" ratio={s / base_state:.3f} vs=ddp" if base_state else ""))
        print(f"RESULT peak_rss_{args.model}_{name} {rss:.0f} MiB"
              + (f" ratio={rss / base_rss:.3f} vs=ddp" if base_rss else ""))


if __name__ == "__main__":
    main()
