"""Building blocks of the one training loop (tinylm/train.py): process setup, precision, AdamW, the LR
schedule, gradient accumulation with exact token-level scaling, held-out evaluation and samples.

Kept apart from train.py so that the loop itself reads top to bottom as its phases; benchmarks
(bench/train_throughput.py, bench/memory.py) call these pieces directly to time one step.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tinylm.training.objectives import count_tokens, to_device
from tinylm.training.parallel import grad_norm_and_clip, init_process_group
from tinylm.training.trainconfig import TrainConfig


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device). Initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() and world == 1:
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        init_process_group(backend, device, cfg.dist_timeout_min)
    return rank, local_rank, world, device


def keep_freed_memory_in_heap() -> None:
    """Stop glibc from returning freed activation buffers to the OS after every step (Linux, CPU).

    By default glibc serves blocks above a dynamic threshold with fresh mmap() pages, so every step
    re-faults and zero-fills each large activation (~33k page faults per `small` step). Raising
    the mmap threshold to its 32 MiB maximum and the trim threshold to 1 GiB keeps those blocks
    for reuse: 33k -> 6k faults, ~3% more tokens/s (bench/RESULTS.md). Memory is still freed at exit.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or no glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter ids from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (x86 avx512_bf16 / amx_bf16, Arm bf16).

    TINYLM_CPU_FP32=1 makes `dtype: auto` stay fp32 on CPU (bit-exact runs; the test suite sets it).
    """
    if os.environ.get("TINYLM_CPU_FP32") == "1":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:  # macOS / Windows: stay on fp32
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))


def autocast_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, use GradScaler)."""
    dtype = cfg.dtype
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # bf16 autocast is ~2.4x faster than fp32 on CPUs with native bf16 matmuls (AVX512-BF16 /
            # AMX) at equal validation loss (bench/RESULTS.md); on AVX2-only CPUs it is slower.
            dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    if dtype == "fp32":
        return None, False
    if dtype == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not norms, biases, embeddings). Trainable params only."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            no_decay_ids.add(id(module.weight))
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() yields tied weights once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw: dict[str, Any] = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8, **kw)


def lr_at(step: int, cfg: TrainConfig, total_steps: int, time_progress: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to min_lr (by steps, or by elapsed time if no step count)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if total_steps > 0:
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    else:
        progress = time_progress
    progress = min(max(progress, 0.0), 1.0)
    min_lr = cfg.final_min_lr
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def accumulate_gradients(objective: Any, model: torch.nn.Module, batches: Any, n_micro: int,
                         device: torch.device, amp: Any = contextlib.nullcontext, scaler: Any = None,
                         micro_scale: float = 1.0, ddp: bool = False,
                         backward: Any = None) -> tuple[torch.Tensor, dict, float]:
    """Forward + backward over the micro-batches of one optimizer step.

    Gradients accumulate d(sum_micro loss_sum * micro_scale). Returns (stats, metrics, data_seconds):
    stats = float64 [sum of item losses, n_items, non-padding tokens, 0] (all-reduce it under DDP),
    metrics = the objective's extra scalars averaged over micro-batches. `backward(scaled_loss, micro)`
    replaces the plain `.backward()` (DeepSpeed's engine does its own).
    """
    stats = torch.zeros(4, dtype=torch.float64, device=device)
    extra: dict[str, float] = {}
    data_s = 0.0
    it = iter(batches)
    for micro in range(n_micro):
        t_data = time.time()
        batch = next(it)
        stats[2] += count_tokens(batch)
        batch = to_device(batch, device)
        data_s += time.time() - t_data
        # DDP: all-reduce gradients only on the last micro-batch.
        sync = model.no_sync() if (ddp and micro < n_micro - 1) else contextlib.nullcontext()
        with sync:
            with amp():
                loss_sum, n_items, metrics = objective.loss(model, batch)
            scaled = loss_sum * micro_scale
            if backward is not None:
                backward(scaled, micro)
            else:
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        stats[0] += loss_sum.detach().double()
        stats[1] += float(n_items)
        stats[2] += batch.pop("sampled_tokens", 0)  # GRPO: tokens known only after sampling in loss()
        for k, v in metrics.items():
            extra[k] = extra.get(k, 0.0) + float(v) / n_micro
    return stats, extra, data_s


def finish_gradients(params: list[torch.nn.Parameter], n_total: float, world: int, micro_scale: float,
                     grad_clip: float) -> float:
    """Turn accumulated d(sum loss * c) (averaged over ranks by DDP) into d(sum loss / N); clip.

    Returns the global gradient norm before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, world / (micro_scale * n_total))
    return grad_norm_and_clip(params, grad_clip)  # FSDP2: the norm of the shards, reduced over ranks


# -- evaluation and samples ----------------------------------------------------------------------

@torch.no_grad()
def evaluate(objective: Any, model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
             autocast_dtype: torch.dtype | None, rank: int, world: int) -> float | None:
    """Validation loss = sum of item losses / number of items over `eval_batches` batches (all ranks)."""
    if not cfg.data.val:
        return None
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    it = objective.batches("val", rank, world)
    for i, batch in enumerate(it):
        if cfg.eval_batches and i >= cfg.eval_batches:
            break
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss_sum, n_items, _ = objective.loss(model, batch)
        totals[0] += loss_sum.double()
        totals[1] += float(n_items)
    if world > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


@torch.no_grad()
def generate_samples(objective: Any, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig,
                     device: torch.device, autocast_dtype: torch.dtype | None) -> list[tuple[str, str]]:
    """Greedy continuations of cfg.sample_prompts (short; for eyeballing progress)."""
    was_training = model.training
    model.eval()
    out = []
    for prompt in cfg.sample_prompts:
        ids = torch.tensor([objective.sample_ids(prompt)], device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.sample_max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        out.append((prompt, tokenizer.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=False)))
    model.train(was_training)
    return out
