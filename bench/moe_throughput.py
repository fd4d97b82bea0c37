"""MoE vs dense training throughput at equal ACTIVE parameters (CPU).

MoE: the `small-moe` preset (8 routed experts of width 640, top-2, 1 shared expert, first layer
dense; 74M total / 32.8M active parameters). Dense: the same model with num_experts=0 and one
SwiGLU width chosen so the active parameter counts match (1888: 8 * 1888 = 1664 + 7 * 3 * 640).
Both run the trainer's step (LMObjective, fused AdamW, grad clip) on the same packed rows,
interleaved step by step in one process so machine load affects both alike; medians reported.

    python bench/moe_throughput.py                   # seq 256 x batch 8, 1 warmup + 4 timed steps each
    python bench/moe_throughput.py --dtype bf16 --steps 6

Ends with `RESULT moe_train_tokens_per_s <v> tok/s ratio=<moe/dense> vs=dense_equal_active`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch

    from tinylm.data.dataset import BatchIterator, load_token_dataset
    from tinylm.models.config import count_parameters, preset_config
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.training.loop_parts import accumulate_gradients, build_optimizer, finish_gradients
    from tinylm.training.objectives import LMObjective
    from tinylm.training.trainconfig import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--data", default=str(REPO / "data/pretrain/train.jsonl"))
    args = ap.parse_args()

    moe_cfg = preset_config("small-moe")
    dense_cfg = preset_config("small-moe", num_experts=0, intermediate_size=1888)
    (moe_total, moe_active), (dense_total, dense_active) = count_parameters(moe_cfg), count_parameters(dense_cfg)
    cfg = TrainConfig(seq_len=args.seq, batch_size=args.batch, lr=3e-4)
    ds = load_token_dataset(args.data, kind="pretrain", seq_len=args.seq)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    scale = 1.0 / (args.batch * args.seq)
    runs = {}
    for name, mcfg in (("dense", dense_cfg), ("moe", moe_cfg)):
        torch.manual_seed(0)
        model = TinyLMForCausalLM(mcfg).train()
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        runs[name] = (model, opt, iter(BatchIterator(ds, args.batch, args.seq, seed=0)))

    def step(name: str) -> tuple[int, float]:
        model, opt, it = runs[name]
        params = [p for p in model.parameters() if p.requires_grad]
        stats, _, _ = accumulate_gradients(LMObjective(cfg), model, [next(it)], 1, torch.device("cpu"), amp, None, scale)
        finish_gradients(params, float(stats[1]), 1, scale, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if name == "moe":
            model.update_expert_bias()
        return int(stats[2]), float(stats[0] / stats[1])

    for _ in range(args.warmup):
        for name in runs:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens, losses = 0, {}
    for _ in range(args.steps):
        for name in runs:  # interleaved: load changes hit both
            t0 = time.perf_counter()
            tokens, losses[name] = step(name)
            times[name].append(time.perf_counter() - t0)
    tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"dense: {dense_total / 1e6:.1f}M params ({dense_active / 1e6:.1f}M active) | {tps['dense']:.0f} tok/s | "
          f"loss {losses['dense']:.3f}")
    print(f"moe:   {moe_total / 1e6:.1f}M params ({moe_active / 1e6:.1f}M active) | {tps['moe']:.0f} tok/s | "
          f"loss {losses['moe']:.3f}")
    print(f"setup: seq {args.seq} x batch {args.batch}, {args.dtype}, {args.steps} timed steps each, "
          f"{torch.get_num_threads()} threads")
    print(f"RESULT moe_train_tokens_per_s {tps['moe']:.1f} tok/s ratio={tps['moe'] / tps['dense']:.2f} "
          "vs=dense_equal_active")


if __name__ == "__main__":
    main()
