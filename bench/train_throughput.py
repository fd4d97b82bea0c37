"""Training throughput: tinylm `small` (30M) vs transformers' LlamaForCausalLM of the same shape.

Both models run the SAME training step of tinylm's loop (`accumulate_gradients` +
`finish_gradients` + fused AdamW, grad clip 1.0) on the same packed rows of the bundled
pretraining corpus (seq 340, batch 8: no padding, so every token counts). Each model runs in its
own subprocess so the peak RSS figures do not mix.

Shape: hidden 512, 8 layers, 8 heads / 4 KV heads, SwiGLU 1664, vocab 6400, tied embeddings,
RoPE theta 1e6. Difference: tinylm uses QK-norm (Qwen3); Llama has none (slightly less work).

    python bench/train_throughput.py                  # fp32, 3 warmup + 10 timed steps each
    python bench/train_throughput.py --steps 20 --dtype bf16
    python bench/train_throughput.py --profile        # + torch.profiler top ops for tinylm

Prints `RESULT train_tokens_per_s <v> tok/s ratio=<tinylm/hf> vs=hf_llama`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=6400, hidden_size=512, intermediate_size=1664, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=True)


def build(which: str):
    import torch

    torch.manual_seed(0)
    if which == "tinylm":
        from tinylm.models.config import TinyLMConfig
        from tinylm.models.model import TinyLMForCausalLM
        return TinyLMForCausalLM(TinyLMConfig(**SHAPE))
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa"))


def worker(args: argparse.Namespace) -> dict:
    import torch

    from tinylm.data.dataset import BatchIterator, load_token_dataset
    from tinylm.training.loop_parts import (
        accumulate_gradients,
        autocast_settings,
        build_optimizer,
        finish_gradients,
        keep_freed_memory_in_heap,
    )
    from tinylm.training.metrics import peak_memory_mb
    from tinylm.training.objectives import LMObjective
    from tinylm.training.trainconfig import TrainConfig

    cfg = TrainConfig(seq_len=args.seq, batch_size=args.batch, lr=3e-4, dtype=args.dtype)
    cfg.data.train = args.data
    device = torch.device("cpu")
    keep_freed_memory_in_heap()  # what `tinylm train` does on CPU; applied to both models alike
    model = build(args.only).train()
    ds = load_token_dataset(args.data, kind="pretrain", seq_len=args.seq)
    it = iter(BatchIterator(ds, args.batch, args.seq, seed=0))
    obj = LMObjective(cfg)
    opt = build_optimizer(model, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    ac_dtype, _ = autocast_settings(cfg, device)
    import contextlib
    amp = (lambda: torch.autocast("cpu", dtype=ac_dtype)) if ac_dtype else contextlib.nullcontext
    scale = 1.0 / (args.batch * args.seq)

    def step() -> tuple[int, float]:
        stats, _, _ = accumulate_gradients(obj, model, [next(it)], 1, device, amp, None, scale)
        finish_gradients(params, float(stats[1]), 1, scale, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(stats[2]), float(stats[0] / stats[1])

    for _ in range(args.warmup):
        step()
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        n, loss = step()
        tokens += n
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"model": args.only, "tokens_per_s": tokens / dt, "step_s": dt / args.steps, "loss": loss,
           "tokens_per_cpu_s": tokens / cpu, "load_avg": os.getloadavg()[0],
           "peak_rss_mb": peak_memory_mb(), "params_m": sum(p.numel() for p in params) / 1e6,
           "threads": torch.get_num_threads()}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--seq", type=int, default=340)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = CPU autocast")
    ap.add_argument("--data", default=str(REPO / "data/pretrain/train.jsonl"))
    ap.add_argument("--profile", action="store_true", help="print torch.profiler top ops (tinylm)")
    ap.add_argument("--only", choices=["tinylm", "hf_llama"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print("JSON " + json.dumps(worker(args)))
        return
    results = {}
    for which in ("tinylm", "hf_llama"):
        cmd = [sys.executable, __file__, "--only", which, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seq", str(args.seq), "--batch", str(args.batch), "--dtype", args.dtype, "--data", args.data]
        if args.profile and which == "tinylm":
            cmd.append("--profile")
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON ")][-1]
        results[which] = r = json.loads(line[5:])
        print(f"{which:9s} {r['params_m']:.1f}M params | {r['tokens_per_s']:7.1f} tok/s | {r['step_s']:.2f} s/step | "
              f"{r['tokens_per_cpu_s']:6.1f} tok/CPU-s | peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB | loss {r['loss']:.3f} | "
              f"threads {r['threads']} | load avg {r['load_avg']:.1f}")
        if "profile" in r:
            print(r["profile"])
    ours, ref = results["tinylm"]["tokens_per_s"], results["hf_llama"]["tokens_per_s"]
    print(f"setup: seq {args.seq} x batch {args.batch}, {args.dtype}, {args.steps} timed steps, non-padding tokens; "
          "tinylm has QK-norm, Llama does not")
    print(f"RESULT train_tokens_per_s {ours:.1f} tok/s ratio={ours / ref:.2f} vs=hf_llama")


if __name__ == "__main__":
    main()
