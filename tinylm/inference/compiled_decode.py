"""The compiled decode step for CPU: one ahead-of-time compiled library per model shape, kept on disk.

Why: at batch 1 a decode step is dominated by per-op overhead for `tiny` and by it plus the weight
products for `small` (~200 eager aten calls of a few microseconds each, docs/performance.md section
3b); llama.cpp evaluates one prebuilt graph per token. Here the step of tinylm.inference.fast_decode
is written without data-dependent control flow — the new K/V are written with `index_copy_` at a
position passed as a tensor, attention reads the first pos + 1 cache positions, a size given as a
dynamic dimension (attending the whole 1024-2048-position buffer with a mask cost 14-25% at one row
and 2x at 16) — so `torch.export` traces it once and AOTInductor (Ansel et al. 2024, "PyTorch 2")
compiles it to one shared library with a C++ wrapper: no Python and no dispatcher between its kernels.

The weights are *inputs* of the compiled step, not constants in it, so one library serves every
checkpoint of the same architecture, fp32 or int8, and weights that change during RL rollouts; it
is keyed by the shapes, the thread count, the CPU and the torch version, and stored as
`$TINYLM_DECODE_CACHE/<key>.pt2` (default ~/.cache/tinylm/decode). Building takes ~10-60 s once per
machine and shape; loading it ~2 ms (torch.compile's warm start was ~12 s).

TINYLM_COMPILE_DECODE: `auto` (default) uses a library already built, `1` also builds a missing one
(`tinylm chat|generate` set it unless told `--no-compile`), `0` never compiles. Any failure falls
back to the eager fast step with one log line. Covers fp32 models (fp32 or `--quantize int8`
products) when all cache rows decode in step (chat, equal-length prompts). From 4 rows on the
products are compute bound and the eager step's oneDNN GEMM may be faster than the compiled plain
matmul (`small` at 16 rows, one thread), so there it is timed against the eager one once per library
and used only where faster.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from tinylm.inference.fast_decode import INT8_DYNAMIC_ROWS, FastDecoder, Prepared
from tinylm.models.kv_cache import StaticKVCache

log = logging.getLogger(__name__)

MEASURED_ROWS = 4  # from this many rows on the step is used only where measured faster than eager
MAX_LOADED = 4  # compiled steps kept per model (fp32 and int8, a few shapes) before the oldest is dropped
BUCKET = 256  # cache lengths are rounded up to a multiple of this, so one library serves many requests


def mode() -> str:
    """'0' (never), 'auto' (use a library already on disk: the default) or '1' (also build one)."""
    value = os.environ.get("TINYLM_COMPILE_DECODE", "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "0"
    return "1" if value in ("1", "true", "yes", "on") else "auto"


def enabled() -> bool:
    return mode() != "0"


def set_mode(flag: bool | None, default: str | None = None) -> None:
    """A command's --compile / --no-compile; without one, TINYLM_COMPILE_DECODE, else `default`."""
    if flag is not None:
        os.environ["TINYLM_COMPILE_DECODE"] = "1" if flag else "0"
    elif default is not None:
        os.environ.setdefault("TINYLM_COMPILE_DECODE", default)


def cache_dir() -> Path:
    root = os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm"
    return Path(os.environ.get("TINYLM_DECODE_CACHE") or Path(root) / "decode")


def bucket(max_seq_len: int) -> int:
    """The cache length to allocate when the compiled step may run: fewer distinct shapes."""
    return -(-max_seq_len // BUCKET) * BUCKET


# ---------------------------------------------------------------------------------------------
# The step: no data-dependent control flow; weights passed in as one flat list.
# ---------------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in plain ops (inductor fuses them into one loop)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x (b, K) @ W.T -> (b, N) fp32, as fast_decode.Product: fp32 w (K, N); int8 w (N, K) with bf16
    scales: bf16 activations (1-3 rows); int8 w (K, N) with fp32 scales: activations quantised per
    row and int8 x int8 products (4+ rows)."""
    if scale is None:
        return x @ w  # the split-K layout's memory viewed whole
    if scale.dtype == torch.bfloat16:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w, scale).float()
    sx = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (b, 1)
    q = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
    return torch._int_mm(q, w) * sx * scale


def _product(prod, rows: int) -> list[torch.Tensor]:
    """The weights `_mm` takes for this product at `rows` rows (views or fast_decode's own copies)."""
    if prod.scale is None:
        return [prod.w.reshape(-1, prod.w.shape[-1])]
    return list(prod.int8_rows_weights()) if rows >= INT8_DYNAMIC_ROWS else [prod.w, prod.scale]


def step_weights(p: Prepared, rows: int) -> list[torch.Tensor]:
    """The step's weight inputs, in StaticStep.forward's order: per layer qkv, o, gate_up, down
    (1 tensor each, 2 when int8), ln1, ln2, [qk_norm]; then final norm, lm_head, embedding, RoPE table."""
    h, out = p.embed.shape[1], []
    for lw in p.layers:
        for prod in (lw.qkv, lw.o, lw.gate_up, lw.down):
            out += _product(prod, rows)
        out += [lw.ln1[:h], lw.ln2[:h]] + ([lw.qk_norm] if lw.qk_norm is not None else [])
    return out + [p.norm[:h], *_product(p.lm_head, rows), p.embed, p.rope]


class StaticStep(torch.nn.Module):
    """The decode step of fast_decode.decode_step, traceable once for every position; no tensors of its own."""

    def __init__(self, p: Prepared) -> None:
        super().__init__()
        self.n_layers, self.n_heads, self.n_kv, self.head_dim = len(p.layers), p.n_heads, p.n_kv, p.head_dim
        self.inter, self.eps = p.inter, p.eps
        self.int8, self.qk_norm = p.lm_head.scale is not None, p.layers[0].qk_norm is not None

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                weights: list[torch.Tensor], length: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (b,) -> logits (b, V) fp32. keys/values: per layer (B, n_kv, S, D). length: any tensor of
        shape (max(pos) + 1,), a dynamic size in the library: attention reads that many positions.
        In step (rows None): every cache row, all at position pos (1,). Ragged: cache rows `rows` (b,)
        at positions pos (b,) — the server's continuous batching — with a mask per row."""
        b, nq, nk, d, eps = tokens.shape[0], self.n_heads, self.n_kv, self.head_dim, self.eps
        ws = iter(weights)

        def product() -> tuple[torch.Tensor, torch.Tensor | None]:
            return (next(ws), next(ws)) if self.int8 else (next(ws), None)

        layers = [(product(), product(), product(), product(), next(ws), next(ws),
                   next(ws) if self.qk_norm else None) for _ in range(self.n_layers)]
        final_norm, head, embed, rope = next(ws), product(), next(ws), next(ws)
        cos, sin = rope.index_select(0, pos)[:, None].unbind(2)  # (1 or b, 1, D); sin with rotate_half's sign
        n = length.shape[0]
        if rows is not None:  # ragged: row i attends to its positions 0..pos[i] only
            mask = (torch.arange(n)[None] <= pos[:, None]).view(b, 1, 1, n)
            write = (rows[:, None], torch.arange(nk)[None], pos[:, None])  # (b, nk) index grid
        x = F.embedding(tokens, embed)  # (b, H)
        for (qkv_w, o_w, gu_w, down_w, ln1, ln2, qk_norm), k_buf, v_buf in zip(layers, keys, values):
            qkv = _mm(_rms(x, ln1, eps), *qkv_w)  # (b, (nq + 2 nk) D)
            qk = qkv[:, : (nq + nk) * d].view(b, nq + nk, d)
            if qk_norm is not None:
                qk = _rms(qk, None, eps) * qk_norm
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            q = qk[:, :nq].reshape(b, nk, nq // nk, d)  # GQA: g query heads of a K/V head as g rows
            if rows is None:
                k_buf.index_copy_(2, pos, qk[:, nq:, None])  # (b, nk, 1, D) at position pos
                v_buf.index_copy_(2, pos, qkv[:, (nq + nk) * d:].view(b, nk, 1, d))
                y = F.scaled_dot_product_attention(q, k_buf[:, :, :n], v_buf[:, :, :n])  # no mask: 0..pos
            else:
                k_buf.index_put_(write, qk[:, nq:])
                v_buf.index_put_(write, qkv[:, (nq + nk) * d:].view(b, nk, d))
                y = F.scaled_dot_product_attention(q, k_buf[:, :, :n].index_select(0, rows),
                                                   v_buf[:, :, :n].index_select(0, rows), attn_mask=mask)
            y = y.reshape(b, nq * d)
            x = x + _mm(y, *o_w)
            gu = _mm(_rms(x, ln2, eps), *gu_w)
            x = x + _mm(F.silu(gu[:, : self.inter]) * gu[:, self.inter:], *down_w)
        return _mm(_rms(x, final_norm, eps), *head).float()


def supports(p: Prepared) -> str | None:
    """None when the compiled step can run these prepared weights, else why not."""
    if p.embed.dtype != torch.float32:
        return "the compiled step is for fp32 models (fp32 or int8 products)"
    return None


# ---------------------------------------------------------------------------------------------
# Libraries on disk.
# ---------------------------------------------------------------------------------------------
def _spec(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype).removeprefix("torch.")]


@functools.cache
def _cpu_id() -> str:
    """The CPU model, its vector instruction sets and torch's capability: generated code uses those
    instructions (AVX-512, AMX), so a library built on another CPU (a shared home directory, a VM
    whose model name hides the ISA) must not be loaded. Cheap, unlike inductor's pick_vec_isa (~1 s:
    it compiles test programs)."""
    name, flags = platform.processor(), ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        name = info.get("model name", name)
        flags = " ".join(sorted(f for f in info.get("flags", "").split() if f.startswith(("avx", "amx", "fma"))))
    return f"{platform.machine()} {name} {torch.backends.cpu.get_cpu_capability()} {flags}"


@functools.cache
def _code_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def library_key(p: Prepared, cache: StaticKVCache, weights: list[torch.Tensor], rows: int, ragged: bool) -> str:
    """Everything the generated code depends on: shapes and dtypes, constants, the thread count
    (inductor writes it into its OpenMP loops), the CPU, torch and this file."""
    desc = dict(weights=[_spec(w) for w in weights], cache=_spec(cache.keys[0]), layers=len(cache.keys),
                batch=cache.batch_size, rows=rows, ragged=ragged, heads=[p.n_heads, p.n_kv, p.head_dim, p.inter], eps=p.eps,
                threads=torch.get_num_threads(), cpu=_cpu_id(),
                torch=torch.__version__, code=_code_hash())
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def example_inputs(cache: StaticKVCache, weights: list[torch.Tensor], b: int, ragged: bool) -> tuple:
    """Inputs to trace the step with (StaticStep.forward's order; the length is made dynamic)."""
    zeros = [torch.zeros_like(k) for k in cache.keys], [torch.zeros_like(v) for v in cache.values]
    length = torch.empty(min(8, cache.max_seq_len - 1))
    pos = torch.zeros(b if ragged else 1, dtype=torch.long)
    return (torch.zeros(b, dtype=torch.long), pos, *zeros, weights, length) + ((torch.arange(b),) if ragged else ())


def build(step: StaticStep, example: tuple, path: Path) -> None:
    """torch.export the step on example inputs and compile it with AOTInductor into `path` (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    t0 = time.perf_counter()
    print(f"tinylm: compiling the decode step for this model shape (once per machine, ~10-60 s) -> {path}",
          file=sys.stderr, flush=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations
            length = torch.export.Dim("length", min=2, max=example[2][0].shape[2] - 1)  # 1 prompt token + 1
            dynamic = (None, None, [None] * len(example[2]), [None] * len(example[3]), [None] * len(example[4]),
                       {0: length}) + (None,) * (len(example) - 6)
            exported = torch.export.export(step, example, dynamic_shapes=dynamic, strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("compiled decode step built in %.1f s", time.perf_counter() - t0)


class Library:
    """A compiled step read from disk, called like StaticStep.forward: AOTInductor's package loader fed
    the flat input list. (`torch._inductor.aoti_load_package` wraps the same loader, but imports
    inductor and probes the CPU by compiling test programs at load, ~1.8 s per process, and re-parses
    the call spec on every call, ~50 µs per step; the library key already names the CPU.)"""

    def __init__(self, path: Path) -> None:
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 weights: list[torch.Tensor], length: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.loader.boxed_run([tokens, pos, *keys, *values, *weights, length, *([] if rows is None else [rows])])[0]


def load(path: Path):
    """The compiled step in `path` (through torch's own wrapper where the loader's API differs)."""
    if hasattr(torch._C, "_aoti") and hasattr(torch._C._aoti, "AOTIModelPackageLoader"):
        return Library(path)
    return torch._inductor.aoti_load_package(str(path))


def time_steps(p: Prepared, cache: StaticKVCache, weights: list[torch.Tensor], fn) -> tuple[float, float]:
    """Seconds of 4 eager and 4 compiled steps (best of 3) on a scratch cache shaped like `cache`."""
    from tinylm.inference.fast_decode import decode_step

    scratch = copy.copy(cache)  # same shapes, own buffers
    scratch.keys, scratch.values = [torch.zeros_like(k) for k in cache.keys], [torch.zeros_like(v) for v in cache.values]
    scratch.seq_lens = cache.seq_lens.clone()
    b = cache.batch_size
    tokens, rows = torch.zeros(b, dtype=torch.long), torch.arange(b)

    start = min(cache.max_seq_len // 2, 128)  # a prompt and an answer into the sequence

    def best(step) -> float:
        times = []
        for _ in range(3):
            scratch.seq_lens.fill_(start)
            t0 = time.perf_counter()
            for _ in range(4):
                step()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        eager = best(lambda: decode_step(p, scratch, tokens, rows))
        compiled = best(lambda: fn(tokens, scratch.seq_lens[:1].clone(), scratch.keys, scratch.values, weights,
                                   torch.empty(start + 1)))
    return eager, compiled


def measured_faster(path: Path) -> bool | None:
    """The verdict kept beside a library built for 4+ rows (None: not measured yet)."""
    verdict = path.with_suffix(".json")
    return bool(json.loads(verdict.read_text())["compiled_faster"]) if verdict.exists() else None


def measure(path: Path, p: Prepared, cache: StaticKVCache, weights: list[torch.Tensor], fn) -> bool:
    """From 4 rows on the products are compute bound: the eager step's oneDNN GEMM on prepacked weights
    (fast_decode.Product) can beat the compiled step's plain matmul (`small` at 16 rows with one
    thread, docs/performance.md). Timed once per library, the verdict kept beside it."""
    eager, compiled = time_steps(p, cache, weights, fn)
    verdict = path.with_suffix(".json")
    tmp = verdict.with_name(f"{verdict.stem}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(compiled_faster=compiled < eager, eager_s=eager, compiled_s=compiled)))
    os.replace(tmp, verdict)
    log.info("compiled step at %d rows: %.2f ms vs eager %.2f ms", cache.batch_size, compiled * 250, eager * 250)
    return compiled < eager


class CompiledDecoder:
    """Compiled steps of one model, one per library key, kept on the model so that every generate()
    call reuses them. `__call__` returns None where the eager step must run."""

    def __init__(self, model) -> None:
        self.loaded: dict = model.__dict__.setdefault("_tinylm_compiled_decode", {})
        self.found: dict = {}  # (ragged, rows) -> (weights, compiled step or None) for `self.owner`
        self.owner: tuple | None = None  # (prepared weights, cache) that `found` is for

    def __call__(self, p: Prepared, cache: StaticKVCache, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        b = tokens.shape[0]
        if self.loaded.get("failed") or supports(p) is not None:
            return None
        in_step = b == cache.batch_size and rows.tolist() == list(range(b))
        lens = (cache.seq_lens if in_step else cache.seq_lens[rows]).tolist()
        in_step = in_step and min(lens) == max(lens)
        if not in_step and b >= MEASURED_ROWS:  # ragged: 1-3 rows (a server's few clients)
            return None
        if not 1 <= min(lens) or max(lens) >= cache.max_seq_len - 1:
            return None  # (the library reads 2 .. S-1 positions: the last position of a full cache runs eagerly)
        weights, fn = self.entry(p, cache, b, ragged=not in_step)
        if fn is None:
            return None
        try:
            with torch.no_grad():
                if in_step:
                    logits = fn(tokens, cache.seq_lens[:1].clone(), cache.keys, cache.values, weights,
                                torch.empty(lens[0] + 1))
                else:
                    logits = fn(tokens, cache.seq_lens[rows], cache.keys, cache.values, weights,
                                torch.empty(max(lens) + 1), rows)
        except Exception as e:  # noqa: BLE001 - a broken library: eager fast step from now on
            return self._failed(e)
        cache.seq_lens[rows] += 1
        return logits

    def entry(self, p: Prepared, cache: StaticKVCache, b: int, ragged: bool) -> tuple:
        """(weights, compiled step or None) for b rows of `cache`, looked up once per (weights, cache)."""
        if self.owner is None or self.owner[0] is not p or self.owner[1] is not cache:
            self.owner, self.found = (p, cache), {}
        if (ragged, b) not in self.found:
            self.found[(ragged, b)] = self._find(p, cache, b, ragged)
        return self.found[(ragged, b)]

    def _find(self, p: Prepared, cache: StaticKVCache, b: int, ragged: bool) -> tuple:
        """(weights, compiled step or None) for b rows: loaded, read from disk, or built (mode 1)."""
        weights = step_weights(p, b)
        try:
            key = library_key(p, cache, weights, b, ragged)
            fn, path = self.loaded.get(key), cache_dir() / f"{key}.pt2"
            measured = b >= MEASURED_ROWS
            if fn is None and not (measured and measured_faster(path) is False):  # known slower: not loaded
                if not path.exists() and mode() != "1":
                    return weights, None
                if not path.exists():
                    build(StaticStep(p), example_inputs(cache, weights, b, ragged), path)
                fn = load(path)
                if measured and measured_faster(path) is None and not measure(path, p, cache, weights, fn):
                    return weights, None
                while len(self.loaded) >= MAX_LOADED:  # oldest first (other shapes, other quantization)
                    self.loaded.pop(next(iter(self.loaded)))
                self.loaded[key] = fn
        except Exception as e:  # noqa: BLE001 - no compiler, a broken package: eager from now on
            self._failed(e)
            fn = None
        return weights, fn

    def _failed(self, e: Exception) -> None:
        log.warning("compiled decode step failed (%s: %s); using the eager fast step", type(e).__name__, e)
        self.loaded["failed"] = True
        self.found = {}


def prebuild(gen) -> int:
    """Build (or load) the ragged libraries a BatchGenerator uses for 1-3 running sequences of its cache,
    so that a server's first requests do not wait on a build; returns how many are ready (0: the
    model or generator does not decode through the compiled step)."""
    runner = getattr(gen, "runner", None)
    fast = getattr(runner, "fast", None)
    if not isinstance(fast, CompiledFastDecoder):
        return 0
    fast.refresh()
    p, cache, decoder = fast.prepared, runner.cache, fast.compiled
    if supports(p) is not None:
        return 0
    entries = [decoder.entry(p, cache, b, ragged=True) for b in range(1, min(MEASURED_ROWS, cache.batch_size + 1))]
    return sum(fn is not None for _, fn in entries)


class CompiledFastDecoder(FastDecoder):
    """fast_decode.FastDecoder whose steps run the compiled step where it applies, eager elsewhere."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.compiled = CompiledDecoder(model)

    def step(self, p: Prepared, cache: StaticKVCache, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logits = self.compiled(p, cache, tokens, rows)
        return super().step(p, cache, tokens, rows) if logits is None else logits
