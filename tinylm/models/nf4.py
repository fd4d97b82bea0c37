"""4-bit NormalFloat (NF4) weights for QLoRA, in plain PyTorch (CPU and GPU).

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") fine-tunes a frozen
base model whose linear weights are stored in 4 bits, plus small LoRA adapters in 16/32 bits:

- NF4 code book: 16 values placed at quantiles of N(0, 1), rescaled to [-1, 1], with an exact 0.
  Pretrained weights are roughly normal, so every code is used about equally often (the paper's
  "information-theoretically optimal" data type for normal data).
- Blockwise absmax scaling: each block of 64 consecutive weights is divided by its absolute
  maximum, then every value is replaced by the index of the nearest code (4 bits; two per byte).
- Double quantisation: the fp32 absmax scales (one per 64 weights = 0.5 bit/weight) are themselves
  quantised to 8 bits in blocks of 256 (after subtracting their mean), with the 8-bit "dynamic"
  code of Dettmers (2015, "8-Bit Approximations for Parallelism in Deep Learning"): 0.127 bit/weight.
- Forward: dequantise the weight on the fly and run an ordinary matmul. The backward pass only
  needs dL/dx = dL/dy @ W, so the 4-bit weight is dequantised again there instead of keeping the
  full-precision copy alive (that copy is what QLoRA saves).

The code book, the packing (first value in the high nibble) and the rounding (nearest code,
ties to the lower one) follow bitsandbytes exactly, so our bytes and dequantised values equal
`bitsandbytes.functional.quantize_4bit(..., quant_type="nf4", blocksize=64)` (tests/test_nf4.py).
One measured difference, double quantisation only: bitsandbytes' CPU C kernel for the 8-bit stage
picks the second-nearest code for about 0.1% of the scales (those within ~1e-5 of a midpoint
between two codes); we always pick the nearest, as bitsandbytes' pure-PyTorch backend does.
Dequantising the same codes gives bit-identical values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64          # weights per absmax scale (QLoRA)
DQ_BLOCK_SIZE = 256      # absmax scales per second-level scale (double quantisation)


@functools.cache
def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, ascending, float32 (QLoRA appendix; bitsandbytes' `create_normal_map`).

    8 positive quantiles and 7 negative ones of N(0,1) (an asymmetric split so that 0 is exactly
    representable), from probabilities evenly spaced between 0.5 and `offset` (chosen so the outermost
    quantile is not infinite), then divided by the largest value.
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())    # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())   # 7 values < 0
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return values / values.max()  # cached: do not modify in place


@functools.cache
def dynamic_code() -> torch.Tensor:
    """The 256-value signed 8-bit "dynamic tree" code used to quantise the absmax scales.

    Each value is sign * 10**(-e) * fraction: for exponent e = 6..0 (small to large magnitudes), the
    fractions are midpoints of an even grid on [0.1, 1] with 2**(6-e) cells, so larger magnitudes get
    finer steps; plus 0 and 1. 1 + 2*127 + 1 = 256 values.
    """
    data: list[float] = []
    for i in range(7):
        grid = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-6 + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_blocks(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation of the flattened x to indices into the sorted `code`.

    Returns (idx (n,) uint8, absmax (ceil(n / block_size),) float32). The last block may be short.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = math.ceil(n / block_size)
    padded = F.pad(flat, (0, n_blocks * block_size - n)).view(n_blocks, block_size)
    absmax = padded.abs().amax(dim=1)                                     # (n_blocks,)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    # Nearest code = number of midpoints strictly below the value (a tie goes to the lower code).
    code = code.to(flat.device)
    midpoints = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled, midpoints).to(torch.uint8)               # (n,)
    return idx, absmax


def dequantize_blocks(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of quantize_blocks: code[idx] * absmax of its block, flat float32 (n,)."""
    n = idx.numel()
    values = code.to(idx.device)[idx.long()]
    n_blocks = absmax.numel()
    values = F.pad(values, (0, n_blocks * block_size - n)).view(n_blocks, block_size) * absmax[:, None]
    return values.reshape(-1)[:n]


@dataclass
class NF4Weight:
    """A weight matrix in NF4: packed 4-bit indices plus (optionally double-quantised) block scales."""

    packed: torch.Tensor                 # (ceil(n/2),) uint8, two indices per byte, first in the high nibble
    absmax: torch.Tensor                 # (n_blocks,) float32, or uint8 codes when double-quantised
    shape: tuple[int, ...]
    block_size: int = BLOCK_SIZE
    absmax_scale: torch.Tensor | None = None    # (ceil(n_blocks/256),) float32 second-level absmax
    absmax_offset: torch.Tensor | None = None   # () float32 mean subtracted before double quantisation

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = False) -> NF4Weight:
    """Quantise a float tensor to NF4 (QLoRA), optionally with double quantisation of the scales."""
    idx, absmax = quantize_blocks(w, nf4_code(), block_size)
    if idx.numel() % 2:
        idx = F.pad(idx, (0, 1), value=7)  # pad with the code of 0.0, as bitsandbytes does
    packed = (idx[0::2] << 4) | idx[1::2]                                  # (n/2,) uint8
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(w.shape), block_size)
    offset = absmax.mean()
    absmax_q, absmax_scale = quantize_blocks(absmax - offset, dynamic_code(), DQ_BLOCK_SIZE)
    return NF4Weight(packed, absmax_q, tuple(w.shape), block_size, absmax_scale, offset)


def block_scales(q: NF4Weight) -> torch.Tensor:
    """The fp32 absmax of every 64-weight block (undoing double quantisation if used)."""
    if not q.double_quant:
        return q.absmax
    return dequantize_blocks(q.absmax, q.absmax_scale, dynamic_code(), DQ_BLOCK_SIZE) + q.absmax_offset


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4Weight -> dense tensor of q.shape in `dtype` (computed in fp32, like bitsandbytes)."""
    idx = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)  # unpack (n,)
    n = math.prod(q.shape)
    return dequantize_blocks(idx[:n], block_scales(q), nf4_code(), q.block_size).view(q.shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W.T with W dequantised in forward AND backward: only the 4-bit weight is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4 (buffers, so they move with .to() and save).

    Only the input gets a gradient; train it with LoRA adapters on top (tinylm.models.lora.LoRALinear).
    """

    def __init__(self, linear: nn.Linear, double_quant: bool = False, block_size: int = BLOCK_SIZE) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = block_size
        q = quantize_nf4(linear.weight.detach(), block_size, double_quant)
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_absmax", q.absmax)
        if double_quant:
            self.register_buffer("weight_absmax_scale", q.absmax_scale)
            self.register_buffer("weight_absmax_offset", q.absmax_offset)
        self.double_quant = double_quant
        bias = linear.bias
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(self.weight_packed, self.weight_absmax, (self.out_features, self.in_features),
                         self.block_size, getattr(self, "weight_absmax_scale", None),
                         getattr(self, "weight_absmax_offset", None))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) in `dtype`."""
        return dequantize_nf4(self.nf4_weight(), dtype)

    @property
    def weight(self) -> torch.Tensor:
        # Read-only dense view for code that inspects `.weight` (dtype/device/shape, tied-weight checks).
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out). Under autocast, compute in the autocast dtype.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _NF4Matmul.apply(x, self)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"
                f", double_quant={self.double_quant}")


def nf4_bytes(module: nn.Module) -> int:
    """Bytes of NF4 storage (packed weights + scales) inside a module."""
    return sum(b.numel() * b.element_size() for m in module.modules() if isinstance(m, NF4Linear)
               for name, b in m.named_buffers(recurse=False) if name != "bias")


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), double_quant: bool = False,
                     use_bnb: bool = False) -> nn.Module:
    """Replace every nn.Linear (except names ending in `skip`) by a frozen 4-bit NF4 layer, in place.

    use_bnb: use bitsandbytes' `Linear4bit` (CUDA kernels) instead of NF4Linear; the model must then be
    moved to CUDA, where bitsandbytes quantises the weight on the first `.cuda()`.
    """
    tied = set()
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    if out_emb is not None:
        tied.add(id(out_emb))
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] not in skip and id(m) not in tied]
    for name, linear in targets:
        new = _bnb_linear4bit(linear, double_quant) if use_bnb else NF4Linear(linear, double_quant)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    # Weights loaded from safetensors may be views of one memory-mapped file: copy what is left so
    # the mapping (with the now unused fp32 weights) can be released.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu":
                t.data = t.data.clone()
    return model


def _bnb_linear4bit(linear: nn.Linear, double_quant: bool) -> nn.Module:
    """bitsandbytes' Linear4bit (QLoRA reference kernels) holding `linear`'s weight; quantised on .cuda()."""
    if not torch.cuda.is_available():
        raise ValueError("lora.use_bnb=true needs a CUDA GPU (bitsandbytes Linear4bit); "
                         "use the pure-PyTorch NF4 layers (use_bnb=false) on CPU")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("lora.use_bnb=true needs bitsandbytes: pip install bitsandbytes") from None
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
                              compress_statistics=double_quant, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.to(torch.float16), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4", blocksize=BLOCK_SIZE)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer
