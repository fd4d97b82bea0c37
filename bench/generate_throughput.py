"""Generation throughput: tinylm's static-KV-cache decoder vs transformers' generate(), and the server.

Same weights on both sides: the tinylm `small` preset (random init; speed does not depend on the
weights) is written by `tinylm export` as a transformers Qwen3ForCausalLM (same architecture: GQA,
QK-norm, SwiGLU, tied embeddings) and loaded back with AutoModelForCausalLM; logits are checked to
match before timing. Decode rates are measured as
(tokens of N steps - tokens of 1 step) / (time of N steps - time of 1 step), so prefill is excluded
on both sides.

    python bench/generate_throughput.py                # fp32, CPU
    python bench/generate_throughput.py --threads 1 --bf16 --quick
    python bench/generate_throughput.py --llamacpp-only  # tinylm fp32 vs llama.cpp f32 / q8_0, tiny + small

llama.cpp baseline (needs llama-cpp-python): the same random weights exported by `tinylm export
--format gguf` (f32 and q8_0), run through llama-cpp-python with its defaults (f16 KV cache, as users
get it), greedy, one `llama_decode` per token; all take turns within each repeat, best of 3. tinylm fp32 is
compared with llama.cpp f32, tinylm's weight-only int8 decode (`quantize="int8"`, tinylm.inference.fast_decode)
with llama.cpp q8_0; at batch 1 and at batch 16 (llama.cpp: 16 parallel sequences in one context,
one `llama_decode` of 16 tokens per step, through its raw batch API). At batch 1 the unsuffixed
lines time the path `tinylm chat|generate` take by default, the compiled step
(tinylm/inference/compiled_decode.py, built on the warm-up call or read from ~/.cache/tinylm/decode),
the `_eager` lines the eager fast step.

Prints `RESULT <name> <value> <unit> ratio=<x> vs=<baseline>` lines.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time

import torch

from tinylm.export.gguf_export import cpu_has_amx

# Clock for the decode timings; `--cpu-time` switches to process CPU time, which (with --threads 1)
# still measures the work per token when other jobs share the machine.
CLOCK = [time.perf_counter]


@contextlib.contextmanager
def env_var(name: str, value: str):
    """An environment variable set for a block, restored after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name) if old is None else os.environ.update({name: old})


def compile_mode(mode: str):
    """TINYLM_COMPILE_DECODE for a block: '1' builds and uses the compiled step, '0' the eager step."""
    return env_var("TINYLM_COMPILE_DECODE", mode)


def build_models(preset: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from tinylm.export.interop import export
    from tinylm.models.config import preset_config
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.text.tokenizer import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = preset_config(preset, vocab_size=len(tok), eos_token_id=[2, 0])
    ours = TinyLMForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:  # `tinylm export`: the model users would run elsewhere
        ours.save_pretrained(f"{d}/tinylm")
        export(f"{d}/tinylm", f"{d}/hf")
        hf = AutoModelForCausalLM.from_pretrained(f"{d}/hf", dtype=torch.float32).eval()
    ours, hf = ours.to(dtype), hf.to(dtype)
    x = torch.randint(10, len(tok), (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits.float(), atol=6e-2 if dtype != torch.float32 else 1e-4,
                                   rtol=1e-2)
    return ours, hf, tok


def time_ours(model, tok, batch: int, prompt_len: int, new: int) -> float:
    from tinylm.inference.generate import SamplingParams, generate

    prompts = [[int(t) for t in torch.randint(10, 6000, (prompt_len,))] for _ in range(batch)]
    t0 = CLOCK[0]()
    generate(model, tok, prompts, SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True), max_batch=batch)
    return CLOCK[0]() - t0


def time_hf(model, batch: int, prompt_len: int, new: int) -> float:
    x = torch.randint(10, 6000, (batch, prompt_len))
    t0 = CLOCK[0]()
    with torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)
    return CLOCK[0]() - t0


def decode_rates(fns: list, batch: int, new: int, repeats: int) -> list[float]:
    """Tokens/s of decoding only for each fn: difference between an N-token and a 1-token run, best
    of `repeats`. The fns take turns within every repeat, so a machine that drifts (shared VMs do,
    by +-25%) slows both sides alike instead of skewing the ratio."""
    t1, tn = [float("inf")] * len(fns), [float("inf")] * len(fns)
    for fn in fns:
        fn(batch, 1)  # warm-up
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t1[i] = min(t1[i], fn(batch, 1))
            tn[i] = min(tn[i], fn(batch, new))
    return [batch * (new - 1) / max(b - a, 1e-9) for a, b in zip(t1, tn)]


def load_llamacpp(model, outtype: str, d: str, threads: int, amx: bool = False):
    """Export `model` with tinylm's GGUF writer and load it in llama.cpp (None if not installed).
    `amx`: keep llama.cpp's AMX weight buffers, one token per llama_decode (open_in_llama_cpp says why)."""
    try:
        import llama_cpp  # noqa: F401  (None when llama-cpp-python is absent)
    except ImportError:
        return None
    from tinylm.export.gguf_export import export_gguf, open_in_llama_cpp
    from tinylm.text.tokenizer import load_tokenizer, save_pretrained_portable

    if not os.path.exists(f"{d}/tinylm/config.json"):
        model.save_pretrained(f"{d}/tinylm")
        save_pretrained_portable(load_tokenizer(), f"{d}/tinylm")
    path = export_gguf(f"{d}/tinylm", f"{d}/m.{outtype}.gguf", outtype).path
    n_batch = 1 if amx else 256  # logits_all: with n_batch 1, llama-cpp-python keeps n_batch rows of scores otherwise
    return open_in_llama_cpp(path, extra_buffers=True if amx else None, n_ctx=256, n_batch=n_batch, n_ubatch=n_batch,
                             logits_all=amx, n_threads=threads, n_threads_batch=threads, verbose=False)


def clock_name() -> str:
    return "CPU time" if CLOCK[0] is time.process_time else "wall time"


def time_llamacpp(llm, prompt_len: int, new: int) -> float:
    """Prompt in one llama_decode, then `new` greedy tokens one llama_decode each (as tinylm's loop)."""
    import numpy as np

    prompt = [int(t) for t in torch.randint(10, 6000, (prompt_len,))]
    t0 = CLOCK[0]()
    llm.reset()
    llm.eval(prompt)
    for _ in range(new - 1):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return CLOCK[0]() - t0


class LlamaCppBatch:
    """llama.cpp decoding `batch` sequences together through its raw batch API (llama-cpp-python's
    `Llama` class decodes one sequence): one context with n_seq_max=batch and a unified KV cache,
    each step one `llama_decode` of one token per sequence, logits read per sequence."""

    def __init__(self, llm, batch: int, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self.lib, self.batch = llama_cpp, batch
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, n_ctx
        params.n_seq_max, params.kv_unified = batch, True
        params.n_threads, params.n_threads_batch = threads, threads
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp: could not create a multi-sequence context")
        self.n_vocab = llm.n_vocab()
        self.llama_batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.llama_batch)
        self.lib.llama_free(self.ctx)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """entries (token, position, sequence, wants logits) -> greedy next token of each logits entry."""
        import numpy as np

        b = self.llama_batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), (self.n_vocab,))))
                for i, e in enumerate(entries) if e[3]]

    def run(self, prompt_len: int, new: int) -> float:
        """All prompts in one llama_decode, then `new - 1` steps of one token per sequence."""
        prompts = [[int(t) for t in torch.randint(10, 6000, (prompt_len,))] for _ in range(self.batch)]
        t0 = CLOCK[0]()
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        nxt = self._decode([(t, i, s, i == prompt_len - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
        for step in range(new - 1):
            nxt = self._decode([(t, prompt_len + step, s, True) for s, t in enumerate(nxt)])
        return CLOCK[0]() - t0


def llamacpp_batch_baseline(presets: list[str], batch: int, new: int, repeats: int) -> None:
    """Batch `batch` decode: tinylm (fp32, int8) vs llama.cpp (f32, q8_0) on identical weights, alternating."""
    from tinylm.inference import fast_decode
    from tinylm.models.config import preset_config
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.text.tokenizer import load_tokenizer

    threads = torch.get_num_threads()
    print(f"llama.cpp batch {batch}: {threads} thread(s) each, {clock_name()}, best of {repeats}", flush=True)
    u = "tok/s" if CLOCK[0] is time.perf_counter else "tok/cpu-s"
    for preset in presets:
        torch.manual_seed(0)
        tok = load_tokenizer()
        ours = TinyLMForCausalLM(preset_config(preset, vocab_size=len(tok), eos_token_id=[2, 0])).eval()
        with tempfile.TemporaryDirectory() as d:
            llms = {t: load_llamacpp(ours, t, d, threads) for t in ("f32", "q8_0")}
        if llms["f32"] is None:
            print("llama-cpp-python not installed: no llama.cpp baseline (pip install llama-cpp-python)")
            return
        runners = {t: LlamaCppBatch(llm, batch, batch * (32 + new + 8), threads) for t, llm in llms.items()}

        def ours_q(b: int, n: int, q: str, ours=ours, tok=tok) -> float:
            if fast_decode.quantization(ours) != q:  # weights re-prepared (re-packed at 16 rows): not timed
                fast_decode.set_quantization(ours, q)
                time_ours(ours, tok, b, 32, 2)
            return time_ours(ours, tok, b, 32, n)

        def ours_default(b: int, n: int, q: str, ours_q=ours_q) -> float:  # as `tinylm generate` runs it
            with compile_mode("1"):  # compiled step where measured faster at this batch (built in the warm-up)
                return ours_q(b, n, q)

        o, o8, f, q8, c, c8 = decode_rates([lambda b, n: ours_q(b, n, "none"), lambda b, n: ours_q(b, n, "int8"),
                                            lambda b, n, r=runners: r["f32"].run(32, n),
                                            lambda b, n, r=runners: r["q8_0"].run(32, n),
                                            lambda b, n: ours_default(b, n, "none"),
                                            lambda b, n: ours_default(b, n, "int8")], batch, new, repeats)
        fast_decode.set_quantization(ours, None)
        for r in runners.values():
            r.close()
        for name, ours_rate, eager_rate, ref_rate, ref_name in [("", c, o, f, "f32"), ("_int8", c8, o8, q8, "q8_0")]:
            what = "weight-only int8" if name else "fp32"
            print(f"RESULT decode_b{batch}_{preset}{name}_vs_llamacpp_{ref_name} {ours_rate:.1f} {u} "
                  f"ratio={ours_rate / ref_rate:.2f} vs=llamacpp_{ref_name} (llama.cpp {ref_name} {ref_rate:.1f} {u}; "
                  f"tinylm {what}, {batch} sequences, default path: compiled step where measured faster than "
                  f"eager, {ours_rate / eager_rate:.2f}x the eager step)", flush=True)
            print(f"RESULT decode_b{batch}_{preset}{name}_eager_vs_llamacpp_{ref_name} {eager_rate:.1f} {u} "
                  f"ratio={eager_rate / ref_rate:.2f} vs=llamacpp_{ref_name} (llama.cpp {ref_name} {ref_rate:.1f} "
                  f"{u}; tinylm {what} eager step, {batch} sequences)", flush=True)


def llamacpp_baseline(presets: list[str], new: int, repeats: int) -> None:
    """Batch-1 decode: tinylm fp32 / int8 vs llama.cpp f32 / q8_0 on identical weights, alternating."""
    from tinylm.inference import fast_decode
    from tinylm.models.config import preset_config
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.text.tokenizer import load_tokenizer

    threads = torch.get_num_threads()
    print(f"llama.cpp baseline: {threads} thread(s) each, {clock_name()}, best of {repeats}", flush=True)
    for preset in presets:
        torch.manual_seed(0)
        tok = load_tokenizer()
        ours = TinyLMForCausalLM(preset_config(preset, vocab_size=len(tok), eos_token_id=[2, 0])).eval()
        with tempfile.TemporaryDirectory() as d:
            llms = {t: load_llamacpp(ours, t, d, threads) for t in ("f32", "q8_0")}
            if llms["f32"] is not None and cpu_has_amx():  # llama.cpp's best q8_0 decode on this CPU
                llms["q8_0_amx"] = load_llamacpp(ours, "q8_0", d, threads, amx=True)
        if llms["f32"] is None:
            print("llama-cpp-python not installed: no llama.cpp baseline (pip install llama-cpp-python)")
            return

        def ours_q(b: int, n: int, q: str, ours=ours, tok=tok) -> float:
            if fast_decode.quantization(ours) != q:  # weights re-prepared (re-packed at 16 rows): not timed
                fast_decode.set_quantization(ours, q)
                time_ours(ours, tok, b, 32, 2)
            return time_ours(ours, tok, b, 32, n)

        def ours_reference(b: int, n: int, ours=ours, tok=tok) -> float:  # the model's forward, as before
            with env_var("TINYLM_FAST_DECODE", "0"):
                return time_ours(ours, tok, b, 32, n)

        def ours_compiled(b: int, n: int, q: str, ours_q=ours_q) -> float:  # TINYLM_COMPILE_DECODE=1
            with compile_mode("1"):  # (built in decode_rates' warm-up call, or read from disk)
                return ours_q(b, n, q)

        fns = [lambda b, n: ours_q(b, n, "none"), lambda b, n: ours_q(b, n, "int8"),
               lambda b, n, m=llms["f32"]: time_llamacpp(m, 32, n), lambda b, n, m=llms["q8_0"]: time_llamacpp(m, 32, n),
               ours_reference, lambda b, n: ours_compiled(b, n, "none"), lambda b, n: ours_compiled(b, n, "int8")]
        if "q8_0_amx" in llms:  # its prompt goes one token per llama_decode: a little slower than in one batch
            fns.append(lambda b, n, m=llms["q8_0_amx"]: time_llamacpp(m, 32, n))
        o, o8, f, q, r, c, c8, *q_amx = decode_rates(fns, 1, new, repeats)
        fast_decode.set_quantization(ours, None)
        u = "tok/s" if CLOCK[0] is time.perf_counter else "tok/cpu-s"
        eager = "eager fast step" if fast_decode.enabled() else "reference forward (TINYLM_FAST_DECODE=0)"
        # Unsuffixed lines: the path `tinylm chat|generate` take by default (the compiled step).
        for name, ours_rate, ref_rate, ref_name in [("", c, f, "f32"), ("_int8", c8, q, "q8_0"),
                                                    ("_eager", o, f, "f32"), ("_int8_eager", o8, q, "q8_0")] + (
                [("_int8", c8, q_amx[0], "q8_0_amx"), ("_int8_eager", o8, q_amx[0], "q8_0_amx")] if q_amx else []):
            path = f"compiled step, {ours_rate / (o8 if 'int8' in name else o):.2f}x the eager step" if (
                "eager" not in name) else eager
            what = "weight-only int8" if "int8" in name else "fp32"
            amx = ", with its AMX weight buffers, one token per decode" if ref_name.endswith("amx") else ""
            print(f"RESULT decode_b1_{preset}{name}_vs_llamacpp_{ref_name} {ours_rate:.1f} {u} "
                  f"ratio={ours_rate / ref_rate:.2f} vs=llamacpp_{ref_name} (llama.cpp {ref_name[:4]}{amx} "
                  f"{ref_rate:.1f} {u}; tinylm {what}, {path})", flush=True)
        print(f"RESULT decode_b1_{preset}_vs_reference_forward {o:.1f} {u} ratio={o / r:.2f} vs=reference_forward "
              f"(tinylm fp32 eager fast step; through the model's forward, TINYLM_FAST_DECODE=0: {r:.1f} {u})",
              flush=True)


def prefill_rate(ours, hf, prompt_len: int, repeats: int) -> tuple[float, float]:
    from tinylm.models.kv_cache import StaticKVCache

    x = torch.randint(10, 6000, (1, prompt_len))
    best_o = best_h = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            cache = StaticKVCache(ours.config, 1, prompt_len + 1, dtype=next(ours.parameters()).dtype)
            t0 = time.perf_counter()
            ours(x, cache=cache, logits_to_keep=1)
            best_o = min(best_o, time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf(x, use_cache=True, logits_to_keep=1)
            best_h = min(best_h, time.perf_counter() - t0)
    return prompt_len / best_o, prompt_len / best_h


def server_rate(model, tok, clients: int, new: int, max_batch: int | None = None, compiled: bool = False) -> float:
    """Aggregate streamed tokens/s with `clients` concurrent streaming requests over loopback, with
    `tinylm serve`'s layout: HTTP in a thread, the engine loop in the main thread. compiled: as
    `tinylm serve --compile` (libraries for 1-3 running requests built before serving)."""
    import json

    import httpx
    import uvicorn

    from tinylm.inference.engine import Engine
    from tinylm.serving.server import create_app, free_port, serve_in_main_thread

    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": new,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    counts, rate = [0] * clients, []
    port = free_port()
    with compile_mode("1" if compiled else "0"):
        engine = Engine(model, tok, max_batch=max_batch or max(clients, 1), max_queue=clients, max_seq_len=new + 64)
        if compiled:
            from tinylm.inference.compiled_decode import prebuild

            prebuild(engine.gen)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))

    def client(i: int) -> None:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if '"usage"' in line and '"completion_tokens"' in line:
                    counts[i] = json.loads(line[6:])["usage"]["completion_tokens"]

    def drive() -> None:
        try:
            while not server.started:
                time.sleep(0.02)
            client(0)  # warm-up
            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=600)
            rate.append(sum(counts) / (time.perf_counter() - t0))
        finally:
            server.should_exit = True

    threading.Thread(target=drive, daemon=True).start()
    serve_in_main_thread(engine, server)
    return rate[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--bf16", action="store_true", help="also measure bf16")
    p.add_argument("--bf16-only", action="store_true", help="only bf16")
    p.add_argument("--quick", action="store_true", help="fewer tokens / repeats")
    p.add_argument("--no-server", action="store_true")
    p.add_argument("--server-compiled", action="store_true",
                   help="also time the server (max batch 8) with the compiled step against eager, 1 and 3 clients")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp baseline")
    p.add_argument("--llamacpp-only", action="store_true", help="only the llama.cpp baseline")
    p.add_argument("--llamacpp-presets", default="tiny,small", help="presets for the llama.cpp baseline")
    p.add_argument("--no-batch16", action="store_true", help="skip the batch-16 llama.cpp baseline")
    p.add_argument("--no-batch1", action="store_true", help="skip the batch-1 llama.cpp baseline")
    p.add_argument("--cpu-time", action="store_true",
                   help="time decoding in process CPU time (use with --threads 1 on a shared machine)")
    args = p.parse_args()
    os.environ["TINYLM_COMPILE_DECODE"] = "0"  # the eager step, except in the rows named compiled
    if args.cpu_time:
        CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    new, repeats = (32, 1) if args.quick else (64, 3)
    if not args.no_llamacpp:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, llama.cpp baseline")
        if not args.no_batch1:
            llamacpp_baseline(args.llamacpp_presets.split(","), new, repeats)
        if not args.no_batch16:
            llamacpp_batch_baseline(args.llamacpp_presets.split(","), 16, new, repeats)
        if args.llamacpp_only:
            return
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if args.bf16 or args.bf16_only else [])
    dtypes = dtypes[1:] if args.bf16_only else dtypes
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset}")
    for dname, dtype in dtypes:
        ours, hf, tok = build_models(args.preset, dtype)
        suffix = "" if dname == "fp32" else f"_{dname}"
        for batch in (1, 4, 16):
            o, h = decode_rates([lambda b, n, m=ours, t=tok: time_ours(m, t, b, 32, n),
                                 lambda b, n, m=hf: time_hf(m, b, 32, n)], batch, new, repeats)
            print(f"RESULT decode_b{batch}{suffix}_tokens_per_s {o:.1f} tok/s ratio={o / h:.2f} vs=hf_generate "
                  f"(hf {h:.1f} tok/s)", flush=True)
        o, h = prefill_rate(ours, hf, 512, repeats + 1)
        print(f"RESULT prefill{suffix}_tokens_per_s {o:.0f} tok/s ratio={o / h:.2f} vs=hf_forward (hf {h:.0f} tok/s)",
              flush=True)
        if args.server_compiled and dname == "fp32":  # `tinylm serve` (max batch 8) with and without --compile
            for clients in (1, 3):
                e, c = (server_rate(ours, tok, clients, new, max_batch=8, compiled=flag) for flag in (False, True))
                print(f"RESULT server_{clients}_clients_compiled_tokens_per_s {c:.1f} tok/s ratio={c / e:.2f} "
                      f"vs=server_eager (max batch 8, eager {e:.1f} tok/s)", flush=True)
        if not args.no_server and dname == "fp32":
            single = None
            for clients in (1, 4, 16):
                r = server_rate(ours, tok, clients, new)
                single = single or r
                print(f"RESULT server_{clients}_clients_tokens_per_s {r:.1f} tok/s ratio={r / single:.2f} "
                      f"vs=server_1_client", flush=True)


if __name__ == "__main__":
    main()
