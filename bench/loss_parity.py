"""Do the speed-ups cost accuracy? tinylm vs transformers' Qwen3 on the same weights, same loop.

tinylm `small` (hand-written RMSNorm/RoPE backward, fused chunked lm_head + cross-entropy,
malloc tuning) and the transformers `Qwen3ForCausalLM` it exports to (identical architecture:
GQA, QK-norm, SwiGLU, tied embeddings) start from the SAME weights and train with the same
`tinylm train` loop, data, seed and precision. Their validation-loss curves at equal tokens must
agree to numerical noise, while tokens/s shows the speed difference. Writes
bench/loss_parity.png (both curves) and ends with RESULT lines.

    python bench/loss_parity.py                     # fp32, 60 steps of 8 x 256 tokens each
    python bench/loss_parity.py --steps 200 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(model_dir: Path, out: Path, args: argparse.Namespace) -> list[dict]:
    from tinylm.train import train
    from tinylm.training.metrics import read_metrics
    from tinylm.training.trainconfig import load_config

    cfg = load_config(REPO / "recipes/pretrain.yaml", [
        f"model={model_dir}", f"out_dir={out}", f"max_steps={args.steps}", f"dtype={args.dtype}",
        "seq_len=256", "batch_size=8", "warmup_steps=10", f"eval_every={args.eval_every}", "eval_batches=8",
        "log_every=5", "sample_every=100000", "save_every=100000", "lr=1e-3",
        f"data.train={REPO / 'data/pretrain/train.jsonl'}", f"data.val={REPO / 'data/pretrain/val.jsonl'}"])
    train(cfg, log=lambda *a, **k: None)
    return read_metrics(out / "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--plot", default=str(REPO / "bench/loss_parity.png"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinylm.export.interop import export, init_model

    tmp = Path(tempfile.mkdtemp(prefix="tinylm_parity_"))
    init_model("small", tmp / "tinylm", seed=0)
    export(tmp / "tinylm", tmp / "qwen3", arch="qwen3")
    curves = {}
    for name in ("tinylm", "qwen3"):
        rows = run(tmp / name, tmp / f"run_{name}", args)
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        tps = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 5)
        curves[name] = (val, tps)
        print(f"{name:7s} val_loss {' '.join(f'{v:.4f}' for _, v in val)} | median {tps:.0f} tok/s")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (val, _) in curves.items():
        ax.plot([s for s, _ in val], [v for _, v in val], marker="o", label=f"{name} (same init)")
    ax.set_xlabel("optimizer step (8 x 256 tokens each: equal tokens on both sides)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"tinylm vs transformers Qwen3, `small`, {args.dtype}, same loop")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    (t_val, t_tps), (q_val, q_tps) = curves["tinylm"], curves["qwen3"]
    max_gap = max(abs(a - b) for (_, a), (_, b) in zip(t_val, q_val))
    print(f"plot: {args.plot}; largest val-loss gap between the curves: {max_gap:.4f}")
    print(f"RESULT final_val_loss {t_val[-1][1]:.4f} nats ratio={t_val[-1][1] / q_val[-1][1]:.3f} vs=hf_qwen3")
    print(f"RESULT parity_train_tokens_per_s {t_tps:.0f} tok/s ratio={t_tps / q_tps:.2f} vs=hf_qwen3")


if __name__ == "__main__":
    main()
