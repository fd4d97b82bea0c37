"""Where one training step of tinylm `small` spends its time: torch.profiler, top ops by self CPU.

Runs the trainer's own step (LMObjective + accumulate_gradients + finish_gradients + fused AdamW)
on packed rows of the bundled corpus (seq 340 x batch 8, CPU), after warmup steps. Besides the
op table it prints minor page faults per step (fresh large buffers each step are faulted in again
by the kernel; the fused chunked lm_head + cross-entropy removes almost all of them).

    python bench/profile_train.py                 # fp32
    python bench/profile_train.py --dtype bf16    # CPU autocast
    python bench/profile_train.py --logits-ce     # the unfused path (full (B, T, V) logits) for comparison
    python bench/profile_train.py --default-malloc  # without `tinylm train`'s glibc malloc tuning

Ends with `RESULT profile_step_s <v> s ratio=<mm share> vs=aten::mm` (share of self CPU time in matmuls).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch

    from tinylm.data.dataset import BatchIterator, load_token_dataset
    from tinylm.models.config import preset_config
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.training.loop_parts import (
        accumulate_gradients,
        build_optimizer,
        finish_gradients,
        keep_freed_memory_in_heap,
    )
    from tinylm.training.objectives import LMObjective, causal_lm_loss_sum
    from tinylm.training.trainconfig import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=340)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25, help="rows of the op table")
    ap.add_argument("--logits-ce", action="store_true", help="compute CE from full logits (unfused path)")
    ap.add_argument("--data", default=str(REPO / "data/pretrain/train.jsonl"))
    ap.add_argument("--default-malloc", action="store_true", help="skip keep_freed_memory_in_heap()")
    args = ap.parse_args()
    if not args.default_malloc:
        keep_freed_memory_in_heap()

    torch.manual_seed(0)
    model = TinyLMForCausalLM(preset_config(args.preset)).train()
    cfg = TrainConfig(seq_len=args.seq, batch_size=args.batch, lr=3e-4)
    ds = load_token_dataset(args.data, kind="pretrain", seq_len=args.seq)
    it = iter(BatchIterator(ds, args.batch, args.seq, seed=0))
    obj = LMObjective(cfg)
    if args.logits_ce:
        obj.loss = lambda m, b: causal_lm_loss_sum(m, b)[:2] + ({},)  # type: ignore[method-assign]
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    scale = 1.0 / (args.batch * args.seq)

    def step() -> int:
        stats, _, _ = accumulate_gradients(obj, model, [next(it)], 1, torch.device("cpu"), amp, None, scale)
        finish_gradients(params, float(stats[1]), 1, scale, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(stats[2])

    for _ in range(args.warmup):
        step()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    tokens = step()
    step_s = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))
    print(f"{args.preset} {args.dtype} seq {args.seq} x batch {args.batch}: unprofiled step {step_s:.2f} s "
          f"({tokens / step_s:.0f} tok/s), {r1.ru_minflt - r0.ru_minflt} minor page faults, "
          f"matmul share of self CPU {mm / total:.1%}, CE path {'full logits' if args.logits_ce else 'fused chunked'}")
    print(f"RESULT profile_step_s {step_s:.2f} s ratio={mm / total:.2f} vs=aten::mm")


if __name__ == "__main__":
    main()
