"""Plot the VLM demo's training curves (docs/img/vlm_curves.png) from the two runs' metrics.jsonl.

    python scripts/plot_vlm_curves.py runs/vlm_pretrain runs/vlm_sft --out docs/img/vlm_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def losses(run: Path) -> tuple[list[int], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="docs/img/vlm_curves.png")
    args = ap.parse_args()
    fig, axes = plt.subplots(1, len(args.runs), figsize=(5 * len(args.runs), 3.2))
    for ax, run in zip(axes if len(args.runs) > 1 else [axes], args.runs):
        steps, loss = losses(Path(run))
        ax.plot(steps, loss)
        ax.set_yscale("log")
        ax.set_title(Path(run).name)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (assistant tokens)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
