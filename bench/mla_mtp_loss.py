"""Validation loss at equal tokens: GQA vs GQA + MTP (main head only) vs MLA, one size family.

Three pretraining runs of the same recipe, data, seed and step count (recipes/pretrain.yaml),
differing only in the model: `F`, `F` with mtp_depth=1 (DeepSeek-V3's depth, mtp_weight 0.3),
and `F-mla`, for the family F = `tiny` (CPU-sized, default) or `small`. Validation loss is the main
head's alone (MTP adds its loss in training mode only).
Prints RESULT lines and writes docs/img/mla_mtp_loss.png (or ..._small.png).

    OMP_NUM_THREADS=2 python bench/mla_mtp_loss.py --steps 60 --batch-size 4
    OMP_NUM_THREADS=2 python bench/mla_mtp_loss.py --family small --steps 300 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def runs_for(family: str) -> dict[str, tuple[str, dict]]:
    """name -> (preset, config overrides) of the three compared models."""
    return {family: (family, {}), f"{family}+mtp": (family, {"mtp_depth": 1}), f"{family}-mla": (f"{family}-mla", {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=None, help="default runs/bench_mla_mtp[_small]")
    ap.add_argument("--plot", default=None, help="default docs/img/mla_mtp_loss[_small].png")
    ap.add_argument("--skip-train", action="store_true", help="only read the runs' metrics and plot")
    args = ap.parse_args()
    suffix = "" if args.family == "tiny" else f"_{args.family}"
    args.out = args.out or f"runs/bench_mla_mtp{suffix}"
    args.plot = args.plot or f"docs/img/mla_mtp_loss{suffix}.png"
    runs = runs_for(args.family)
    from tinylm.export.interop import init_model

    curves = {}
    for name, (preset, overrides) in runs.items():
        root = Path(args.out) / name
        if not args.skip_train:
            init_model(preset, root / "init", seed=0, **overrides)
        cmd = [sys.executable, "-m", "tinylm", "train", "recipes/pretrain.yaml", f"model={root / 'init'}",
               f"out_dir={root / 'run'}", f"max_steps={args.steps}", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}", f"eval_every={max(args.steps // 8, 1)}", "save_every=1000000",
               "sample_every=1000000", "keep_best=false"]
        if not args.skip_train:
            subprocess.run(cmd, check=True)
        rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"] * args.batch_size * args.seq_len / 1e6, r["val_loss"]) for r in rows if "val_loss" in r]
        mtp = [r.get("mtp_loss_1") for r in rows if r.get("mtp_loss_1") is not None]
        print(f"RESULT val_loss_{name} {curves[name][-1][1]:.4f} nats steps={args.steps}"
              + (f" final_train_mtp_loss_1={mtp[-1]:.4f}" if mtp else ""), flush=True)
    base = curves[args.family][-1][1]
    for name in runs:
        print(f"RESULT val_loss_ratio_{name} {curves[name][-1][1] / base:.4f} x vs={args.family}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=name)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (main head)")
    ax.set_title(f"{args.family} vs +MTP vs {args.family}-mla, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
