"""MLA vs GQA decoding, and speculative decoding at batch 1 (CPU).

1. KV-cache bytes per token, `small-mla` vs `small` (from the cache buffers tinylm allocates).
2. Decode tokens/s of both (random weights: speed does not depend on them) at 1 and 16 rows, with
   a short (64) and a 2k-token context. The cache is filled directly (contents do not change the
   work), so no 2k-token prefill is timed. Both run the reference forward (model.py) with
   `StaticKVCache`, the path MLA uses; tinylm.inference.fast_decode (GQA only) is switched off for fairness.
3. Speculative decoding, greedy, batch 1, on trained models when present: the quickstart SFT model
   with a layer-skip draft (its own first layer + final norm + head, Zhang et al. 2023 "Draft &
   Verify"), and MTP self-speculation with the model trained by bench/mla_mtp_loss.py. Speed-up =
   plain tinylm.inference.generate time / speculative time on the same prompts; identical tokens are checked.
4. The same drafts on the server's path (tinylm/inference/spec_engine.py, the engine's batched
   speculative step) at batch 1, against the engine without a draft (same forward, and the serve
   default fast_decode step).

    OMP_NUM_THREADS=2 python bench/mla_decode.py
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from tinylm.models.config import preset_config
from tinylm.models.kv_cache import StaticKVCache
from tinylm.models.mla import kv_bytes_per_token
from tinylm.models.model import TinyLMForCausalLM

PROMPTS = ["The meaning of life is", "Once upon a time", "从前有一座山，", "The capital of France is"]


def decode_tok_s(model, rows: int, context: int, steps: int) -> float:
    cfg = model.config
    cache = StaticKVCache(cfg, rows, context + steps + 1)
    for buf in cache.keys + cache.values:
        buf.normal_()
    cache.seq_lens.fill_(context)
    tok = torch.randint(0, cfg.vocab_size, (rows, 1))
    with torch.inference_mode():
        model(tok, cache=cache, logits_to_keep=1)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            model(tok, cache=cache, logits_to_keep=1)
        return rows * steps / (time.perf_counter() - t0)


def bench_mla(steps: int) -> None:
    for name in ("small", "small-mla"):
        c = preset_config(name, vocab_size=6400)
        print(f"RESULT kv_bytes_per_token_bf16_{name} {kv_bytes_per_token(c, 2)} B"
              + (f" ratio={kv_bytes_per_token(preset_config('small'), 2) / kv_bytes_per_token(c, 2):.2f} vs=small"
                 if name != "small" else ""))
    torch.manual_seed(0)
    models = {n: TinyLMForCausalLM(preset_config(n, vocab_size=6400)).eval() for n in ("small", "small-mla")}
    for rows, ctx in ((1, 64), (16, 64), (1, 2048), (16, 2048)):
        speed = {n: decode_tok_s(m, rows, ctx, steps) for n, m in models.items()}
        for n, v in speed.items():
            extra = f" ratio={v / speed['small']:.2f} vs=small" if n != "small" else ""
            print(f"RESULT decode_tok_s_{n}_rows{rows}_ctx{ctx} {v:.1f} tok/s{extra}", flush=True)


def layer_skip_draft(model, n_layers: int):
    """The target's first n layers + its final norm and head: a draft sharing weights and tokenizer."""
    draft = copy.copy(model)
    draft._modules = dict(model._modules)  # a shallow copy shares the submodule dict: give it its own
    draft.config = copy.deepcopy(model.config)
    draft.config.num_hidden_layers = n_layers
    inner = copy.copy(model.model)
    inner._modules = dict(model.model._modules)
    inner.layers = model.model.layers[:n_layers]
    inner.config = draft.config
    draft.model = inner
    return draft


def bench_spec(target_dir: str, draft: str, k: int, max_new: int) -> None:
    from tinylm.inference.chat import load_for_inference
    from tinylm.inference.generate import SamplingParams, generate
    from tinylm.inference.speculative import SpecStats, speculative_generate

    target, tok = load_for_inference(target_dir, dtype="float32", device="cpu")
    label = "mtp_self" if draft == "mtp" else f"layerskip{draft}_k{k}"
    d = "mtp" if draft == "mtp" else layer_skip_draft(target, int(draft))
    sp = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    generate(target, tok, [ids[0]], sp)  # warm-up
    t0 = time.perf_counter()
    plain = [generate(target, tok, [i], sp)[0].token_ids for i in ids]
    t_plain = time.perf_counter() - t0
    total = SpecStats()
    t0 = time.perf_counter()
    for i, ref in zip(ids, plain):
        seq, st = speculative_generate(target, d, tok, i, sp, k=k)
        assert seq.output_ids == ref, "speculative greedy output differs from plain decoding"
        total.proposed += st.proposed
        total.accepted += st.accepted
        total.target_forwards += st.target_forwards
        total.tokens += st.tokens
    t_spec = time.perf_counter() - t0
    print(f"RESULT spec_{label}_acceptance {total.acceptance_rate:.3f} frac tokens_per_target_forward="
          f"{total.tokens_per_forward:.2f} model={target_dir}")
    print(f"RESULT spec_{label}_speedup {t_plain / t_spec:.2f} x vs=plain_generate "
          f"plain={len(PROMPTS) * max_new / t_plain:.1f}tok/s spec={len(PROMPTS) * max_new / t_spec:.1f}tok/s", flush=True)


def bench_engine_spec(target_dir: str, draft: str, k: int, max_new: int) -> None:
    """The server's path (tinylm/inference/spec_engine.py under the engine) at batch 1: one request at
    a time, against the engine without a draft with the same forward (TINYLM_FAST_DECODE=0) and with
    the serve default (fast_decode's lean one-token step)."""
    from tinylm.inference.chat import load_for_inference
    from tinylm.inference.generate import BatchGenerator, SamplingParams
    from tinylm.inference.spec_engine import SpecBatchGenerator
    from tinylm.inference.speculative import SpecStats

    target, tok = load_for_inference(target_dir, dtype="float32", device="cpu")
    label = "mtp_self" if draft == "mtp" else f"layerskip{draft}_k{k}"
    d = "mtp" if draft == "mtp" else layer_skip_draft(target, int(draft))
    sp = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    plain_ref = BatchGenerator(target, tok, max_batch=1)
    os.environ["TINYLM_FAST_DECODE"] = "1"
    plain_fast = BatchGenerator(target, tok, max_batch=1)
    os.environ["TINYLM_FAST_DECODE"] = "0"
    spec = SpecBatchGenerator(target, tok, d, k, max_batch=1)
    times: dict[str, float] = {}
    for gen in (plain_ref, plain_fast, spec):
        run_batch1(gen, ids[:1], sp)  # warm-up
    for _ in range(3):  # interleaved rounds, best time of each (the machine is shared)
        spec.stats, spec.verify_forwards, spec.decode_tokens = SpecStats(), 0, 0  # count one run only
        for name, gen in (("plain_ref", plain_ref), ("plain_fast", plain_fast), ("spec", spec)):
            outs, t = run_batch1(gen, ids, sp)
            times[name] = min(t, times.get(name, t))
            if name == "plain_ref":
                ref = outs
            assert outs == ref, f"engine {name} greedy output differs"
    st = spec.spec_stats()
    tokens = len(PROMPTS) * max_new
    print(f"RESULT engine_spec_{label}_acceptance {st['acceptance_rate']:.3f} frac tokens_per_target_forward="
          f"{st['tokens_per_verify_forward']:.2f} batch=1 model={target_dir}")
    print(f"RESULT engine_spec_{label}_speedup {times['plain_ref'] / times['spec']:.2f} x vs=engine_no_draft_same_forward "
          f"plain={tokens / times['plain_ref']:.1f}tok/s spec={tokens / times['spec']:.1f}tok/s")
    print(f"RESULT engine_spec_{label}_speedup_vs_fast {times['plain_fast'] / times['spec']:.2f} x "
          f"vs=engine_no_draft_fast_decode plain_fast={tokens / times['plain_fast']:.1f}tok/s", flush=True)


def run_batch1(gen, ids: list[list[int]], sp) -> tuple[list[list[int]], float]:
    """Requests one after another (batch 1) through a (Spec)BatchGenerator, stepped as the engine does."""
    out, t0 = [], time.perf_counter()
    for i in ids:
        seq = gen.new_sequence(i, sp)
        gen.add(seq)
        while gen.has_work():
            gen.step()
        out.append(seq.output_ids)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--target", default="runs/quickstart/sft/final")
    ap.add_argument("--mtp-model", default="runs/bench_mla_mtp/tiny+mtp/run/final")
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--skip-mla", action="store_true")
    ap.add_argument("--engine-only", action="store_true", help="speculative: only the engine (server) path")
    args = ap.parse_args()
    print(f"# load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}")
    os.environ["TINYLM_FAST_DECODE"] = "0"  # the same (reference) forward for every model
    if not args.skip_mla:
        bench_mla(args.steps)
    if Path(args.target).is_dir():
        for draft, k in (("1", 2), ("1", 4), ("2", 3)):
            if not args.engine_only:
                bench_spec(args.target, draft, k, args.max_new)
            bench_engine_spec(args.target, draft, k, args.max_new)
    else:
        print(f"# {args.target} missing (run `tinylm quickstart`): no draft-model measurement")
    if Path(args.mtp_model).is_dir():
        if not args.engine_only:
            bench_spec(args.mtp_model, "mtp", 1, args.max_new)
        bench_engine_spec(args.mtp_model, "mtp", 1, args.max_new)
    else:
        print(f"# {args.mtp_model} missing (run bench/mla_mtp_loss.py): no MTP self-speculation measurement")
    print(f"# load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
