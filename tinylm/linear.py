"""`Linear`: torch's nn.Linear with a faster path for single-token decoding on CPU.

Why: decoding one token multiplies a (1, K) row by every weight matrix, so it is bound by how fast
the weights stream from memory. On the 2-core EPYC dev box, fp32 `F.linear(x, W)` with M=1 (MKL
reads W (N, K) row by row as N dot products) reaches ~16 GB/s over the 120 MB of the `small` preset,
while `x @ W.T` with W.T stored contiguous (K, N) streams at ~27 GB/s: 7.3 -> 4.4 ms of matmuls per
token (bench/RESULTS.md, "decode"); it still wins at 2-4 rows (10.0 -> 7.8 ms at M=2, 10.9 -> 10.0 at
M=4) and loses from ~16 rows on. So for 1-4 rows we keep a transposed copy of the weight.

The class is a plain nn.Linear subclass: same parameters, state dict, `isinstance` checks, PEFT
targeting and export. The transposed copy is made lazily on the first small-M no-grad fp32 CPU call
and rebuilt whenever the weight changes (tensor version counter), so training in between
generations (sample generations during `tinylm train`) never sees stale weights. Cost: one extra
copy of the weights in memory while decoding on CPU in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_grad_enabled() and x.numel() <= 4 * x.shape[-1]):  # <= 4 rows, inference
            y = x @ self._weight_t()
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def _weight_t(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_decode_weight_t")
        if cached is None or cached[0] != key:
            cached = (key, w.detach().t().contiguous())  # (K, N)
            self.__dict__["_decode_weight_t"] = cached  # not a buffer: never saved or moved
        return cached[1]
