"""Eager fast decode step vs the compiled step (tinylm/inference/compiled_decode.py), one mode per
process.

Alternates eager (TINYLM_COMPILE_DECODE=0) and compiled (=1: the AOTInductor library, built on the
first call or read from ~/.cache/tinylm/decode) generate() calls for one quantization: 150 greedy
tokens after a 32-token prompt, batch 1, best of 3, CPU seconds of this process (one thread), so
other jobs' load does not count. bench/generate_throughput.py times both against llama.cpp.

    OMP_NUM_THREADS=1 python bench/compiled_decode.py --preset tiny --quantize int8
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--quantize", default="none", choices=["none", "int8"])
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tinylm.inference import fast_decode
    from tinylm.inference.generate import SamplingParams, generate
    from tinylm.models.config import preset_config
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    model = TinyLMForCausalLM(preset_config(args.preset, vocab_size=len(tok), eos_token_id=[2, 0])).eval()
    fast_decode.set_quantization(model, args.quantize)
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompt = [[int(t) for t in torch.randint(10, 6000, (32,))]]

    def best_cpu_s(compiled: bool) -> float:
        os.environ["TINYLM_COMPILE_DECODE"] = "1" if compiled else "0"
        generate(model, tok, prompt, params)  # warm-up (and the compile, cached on disk by inductor)
        times = []
        for _ in range(3):
            t0 = time.process_time()
            generate(model, tok, prompt, params)
            times.append(time.process_time() - t0)
        return min(times)

    eager = compiled = float("inf")
    for _ in range(args.rounds):
        eager, compiled = min(eager, best_cpu_s(False)), min(compiled, best_cpu_s(True))
    name = f"{args.preset}" + ("_int8" if args.quantize == "int8" else "")
    print(f"RESULT generate_b1_{name}_compiled {args.tokens / compiled:.1f} tok/cpu-s ratio={eager / compiled:.2f} "
          f"vs=eager_fast_step (eager {args.tokens / eager:.1f} tok/cpu-s; prompt 32, prefill included)", flush=True)


if __name__ == "__main__":
    main()
