"""`Linear`: torch's nn.Linear with a faster path for decoding (up to 32 rows) on CPU in fp32.

Why: decoding one token multiplies a (1, K) row by every weight matrix, so it is bound by how fast
the weights stream from memory (120 MB per token for the `small` preset in fp32). Three things
make torch's default `F.linear(x, W)` slow there, measured on the project's 2-core EPYC machines
(bench/RESULTS.md, docs/performance.md):

1. Layout: with M=1, MKL reads W (N, K) as N dot products; `x @ W.T` with W.T stored contiguous
   (K, N) streams faster (AVX-512 box: 16 -> 27 GB/s).
2. Threads: MKL runs a one-row product on a single core, which cannot saturate DRAM by itself.
   Splitting K into one slice per torch thread and storing the weight as (c, K/c, N) turns the
   product into a batched `bmm` that torch spreads over the cores, one slice each; the c partial
   results are then added (split-K). AVX2 VM, 2 threads, the 33 products of a `small` decode step:
   1 row 13.1 (F.linear) / 10.0 (x @ W.T) -> 6.1 ms; 16 rows 40.0 / 37.8 -> 25.3 ms; from ~64 rows
   on (prefill, training) MKL's own blocking is as good, so the path stops at 32 rows.
3. Calls: projections that read the same input (q/k/v, gate/up) are concatenated into one
   product by `fused_decode`: three calls become one (each eager op costs 3-10 us on these VMs).

The class is a plain nn.Linear subclass: same parameters, state dict, `isinstance` checks, PEFT
targeting and export. The decode copy of the weight is made lazily on the first small-M no-grad
fp32 CPU call and rebuilt whenever the weight may have changed - its tensor version counter moved,
or any optimizer stepped (torch's fused AdamW updates weights without bumping the version counter) -
or the thread count changed, so training in between generations (sample generations during
`tinylm train`, GRPO rollouts) never sees stale weights. Cost: one extra copy of the weights in
memory while decoding on CPU in fp32. Results equal F.linear up to fp32 summation order (the
split-K partial sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0  # optimizer.step() calls in this process: part of every decode-copy cache key


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _decode_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ W.T is a CPU fp32 inference product of <= 32 rows (where the decode layout wins)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and x.numel() <= 32 * x.shape[-1])


def _decode_layout(weight: torch.Tensor) -> torch.Tensor:
    """W (N, K) -> W.T split along K into one slice per thread: (c, K/c, N), contiguous."""
    n, k = weight.shape
    c = min(torch.get_num_threads(), k // 64)  # slices of >= 64 inputs
    c = c if c > 1 and k % c == 0 else 1
    return weight.detach().t().reshape(c, k // c, n).contiguous()


def _decode_matmul(x: torch.Tensor, w_split: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ W.T for w_split = _decode_layout(W) (c, K/c, N) -> (..., N)."""
    c, kc, n = w_split.shape
    if c == 1:
        return x @ w_split[0]
    xs = x.reshape(-1, c, kc).transpose(0, 1)  # (c, rows, K/c): slice i of every row
    return torch.bmm(xs, w_split).sum(0).view(*x.shape[:-1], n)  # one core per slice, then add


def _cached_layout(owner: nn.Module, name: str, weights: list[torch.Tensor]) -> torch.Tensor:
    """The decode layout of cat(weights), cached on `owner` (not a buffer: never saved or moved)."""
    key = (_optimizer_steps, torch.get_num_threads(), *((w.data_ptr(), w._version) for w in weights))
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, _decode_layout(weights[0] if len(weights) == 1 else torch.cat(weights)))
        owner.__dict__[name] = cached
    return cached[1]


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _decode_rows(x, self.weight):
            y = _decode_matmul(x, _cached_layout(self, "_decode_weight", [self.weight]))
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def fused_decode(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor] | None:
    """[layer(x) for layer in layers] as one product when decoding (see above), else None.

    Only for plain bias-free tinylm `Linear`s without hooks: a LoRA / PEFT / NF4 wrapper or a forward
    hook must see its own call, so those models take the per-layer path. The outputs are views
    (split along the last dim) of one (.., N1+N2+..) tensor.
    """
    for layer in layers:
        if (type(layer) is not Linear or layer.bias is not None or layer.weight.dtype != torch.float32
                or layer._forward_hooks or layer._forward_pre_hooks):
            return None
    if not _decode_rows(x, layers[0].weight):
        return None
    w_split = _cached_layout(layers[0], "_fused_decode_weight", [layer.weight for layer in layers])
    return list(_decode_matmul(x, w_split).split([layer.out_features for layer in layers], dim=-1))
