"""The one training loop: every stage (pretrain, SFT, DPO, distillation, GRPO, ...) runs here.

    for step in range(start, max_steps):
        lr = warmup_then_cosine(step)
        for micro in range(grad_accum):                  # gradient accumulation
            loss_sum, n_items = objective.loss(model, next(batches))
            backward(loss_sum * c)                       # c: a constant, keeps values O(1)
        N = all_reduce(sum n_items)                      # over micro-batches and ranks
        grads *= world / (c * N)                         # = d(sum of losses / N): token-level mean
        clip(grads); adamw.step(); moe.update_expert_bias()
        log / validate / sample / checkpoint

Why divide after the fact: averaging per micro-batch means (what most loops do) over-weights
short micro-batches in SFT and breaks "accum 4 x batch 2 == batch 8" (see the HF blog
"Fixing gradient accumulation", 2024). Scaling the summed gradient by 1/N once is exact.

Recipes: AdamW (Loshchilov & Hutter 2019) without decay on norms/biases/embeddings, linear
warmup + cosine decay (nanoGPT), global-norm clipping, bf16 autocast or fp16 + GradScaler
(Micikevicius et al. 2018), optional torch.compile and activation checkpointing, DDP via torchrun.
Run: `tinylm train recipes/pretrain.yaml max_steps=100` or
`torchrun --nproc_per_node 2 -m tinylm train recipes/pretrain.yaml`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tinylm.hf_compat import enable_checkpointing
from tinylm.tokenizer import save_pretrained_portable
from tinylm.trainconfig import TrainConfig, config_to_dict, load_config, save_config


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the step was not applied."""


# -- setup helpers -------------------------------------------------------------------------------

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
        torch.distributed.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return rank, local_rank, world, device


def make_objective(cfg: TrainConfig) -> Any:
    """The objective for `cfg.stage` (tinylm/objectives.py documents the interface).

    One branch per stage; imports are lazy so `tinylm train` only loads what the stage needs.
    """
    stage = cfg.stage
    if stage in ("pretrain", "sft"):
        from tinylm.objectives import LMObjective, SFTObjective
        return SFTObjective(cfg) if stage == "sft" else LMObjective(cfg)
    # Post-training stages (their modules define the classes; imports are lazy):
    if stage == "dpo":
        from tinylm.dpo import DPOObjective
        return DPOObjective(cfg)
    if stage == "distill":
        from tinylm.distill import DistillObjective
        return DistillObjective(cfg)
    if stage == "reason":
        from tinylm.reasoning import ReasonObjective
        return ReasonObjective(cfg)
    if stage == "grpo":
        from tinylm.grpo import GRPOObjective
        return GRPOObjective(cfg)
    raise ValueError(f"stage {stage!r} has no objective (known: pretrain, sft, dpo, distill, reason, grpo)")


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


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens in a batch (all attention masks, or all input ids when unpadded)."""
    if isinstance(batch.get("n_tokens"), int):
        return batch["n_tokens"]
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(sum(v.numel() for k, v in batch.items() if k.endswith("input_ids")))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """Checkpoint to resume from, or None. A fresh run refuses to mix with an old run's checkpoints."""
    from tinylm.checkpoint import latest_checkpoint

    if isinstance(cfg.resume, str) and cfg.resume not in ("", "false", "true"):
        path = Path(cfg.resume)
        if not (path / "trainer_state.pt").exists():
            raise FileNotFoundError(f"resume={cfg.resume}: not a checkpoint directory (no trainer_state.pt)")
        return path
    latest = latest_checkpoint(cfg.out_dir)
    if cfg.resume is True or cfg.resume == "true":
        return latest
    if latest is not None:
        raise ValueError(f"out_dir {cfg.out_dir} already has checkpoints (latest {latest.name}); "
                         "pass resume=true to continue, or choose another out_dir")
    return None


def apply_adapters(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """LoRA / QLoRA hook: freezes the model and adds adapters when cfg.lora.enabled (tinylm/lora.py)."""
    if cfg.lora.enabled:
        from tinylm.lora import apply_lora, check_base_model  # post-training module
        check_base_model(cfg.model)  # a preset is re-drawn on every load: the adapter would lose its base
        model = apply_lora(model, cfg.lora)
        model.lora_settings["base_model"] = cfg.model  # written to adapter_config.json
    return model


def save_final(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, name: str = "final",
               info: dict[str, Any] | None = None) -> Path:
    """HF-format model directory with tokenizer + generation config, written atomically to out_dir/NAME
    (`final`, or `best`: the weights of the lowest validation loss). `info` goes to training_info.json."""
    from tinylm.checkpoint import replace_dir

    final = Path(out_dir) / name
    tmp = Path(tempfile.mkdtemp(dir=Path(out_dir), prefix=f".tmp_{name}_"))
    try:
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.eos_token_id is None and tokenizer is not None:
            gen.eos_token_id = tokenizer.eos_token_id
        if getattr(model, "lora_settings", None) is not None:  # LoRA: only the adapter (PEFT format)
            from tinylm.lora import save_adapter
            save_adapter(model, tmp, model.lora_settings.get("base_model", ""))
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            save_pretrained_portable(tokenizer, tmp)
        if info:
            (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def accumulate_gradients(objective: Any, model: torch.nn.Module, batches: Any, n_micro: int,
                         device: torch.device, amp: Any = contextlib.nullcontext, scaler: Any = None,
                         micro_scale: float = 1.0, ddp: bool = False) -> tuple[torch.Tensor, dict, float]:
    """Forward + backward over the micro-batches of one optimizer step.

    Gradients accumulate d(sum_micro loss_sum * micro_scale). Returns (stats, metrics, data_seconds):
    stats = float64 [sum of item losses, n_items, non-padding tokens, 0] (all-reduce it under DDP),
    metrics = the objective's extra scalars averaged over micro-batches.
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
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    return float(norm)


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


# -- the loop ------------------------------------------------------------------------------------

def train(cfg: TrainConfig, objective: Any = None, log: Any = print) -> dict[str, Any]:
    """Run one training job. Returns a summary (final loss, steps, paths). See module docstring."""
    import yaml

    from tinylm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from tinylm.loading import load_model
    from tinylm.metrics import MetricsLogger, peak_memory_mb, progress_line

    cfg.validate()
    rank, _, world, device = setup_distributed(cfg)
    if device.type == "cpu":
        keep_freed_memory_in_heap()
    master = rank == 0
    say = log if master else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)
    resume_from = resolve_resume(cfg)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, dtype="fp32", tokenizer=cfg.tokenizer or None, seed=cfg.seed)
    model = apply_adapters(model, cfg).to(device)
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    model.train()
    raw_model = model
    objective = objective if objective is not None else make_objective(cfg)
    objective.setup(raw_model, tokenizer, cfg, device)
    optimizer = build_optimizer(raw_model, cfg, device)
    autocast_dtype, use_scaler = autocast_settings(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    is_moe = callable(getattr(raw_model, "update_expert_bias", None)) and getattr(raw_model.config, "num_experts", 0)

    # State to restore (weights, optimizer, RNG, data position, counters).
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = load_checkpoint(resume_from, raw_model, optimizer)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        say(f"resumed from {resume_from} at step {step}")

    fwd_model: torch.nn.Module = raw_model
    if world > 1:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd_model = torch.compile(fwd_model, dynamic=False)  # dynamic shapes hit an inductor CPU bug (torch 2.13)

    train_it = objective.batches("train", rank, world)
    if state.get("data") is not None:
        train_it.load_state_dict(state["data"])
    train_stream = iter(train_it)  # train_it keeps the resumable position (state_dict)
    total_steps = cfg.max_steps
    if total_steps == 0 and cfg.epochs > 0:  # a time budget, if set, is an extra cap
        per_epoch = math.ceil(len(train_it) / cfg.grad_accum)
        total_steps = max(1, math.ceil(cfg.epochs * per_epoch))
    budget_s = cfg.time_budget_min * 60.0

    logger = MetricsLogger(out_dir, cfg.report_to, cfg.run_name, config_to_dict(cfg), enabled=master,
                           resume_step=step if resume_from is not None else None)
    n_params = sum(p.numel() for p in params)
    sizes = f"{n_params / 1e6:.2f}M trainable params"
    if cfg.lora.enabled:  # trainable / total params, and the 4-bit storage for QLoRA
        from tinylm.lora import size_summary
        sizes = size_summary(raw_model)
    say(f"stage {cfg.stage} | model {cfg.model} | {sizes} | device {device} x{world} | "
        f"dtype {autocast_dtype or torch.float32} | global batch {cfg.batch_size * cfg.grad_accum * world} rows "
        f"x {cfg.seq_len} | steps {total_steps or 'until time budget'}")

    micro_scale = 1.0 / (cfg.batch_size * cfg.seq_len)  # constant: keeps summed losses O(1) for fp16
    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    t_start = time.time()
    win_t, win_tokens, win_data, win_steps = time.time(), 0, 0.0, 0
    last_loss, last_val = float("nan"), None
    best_val = float(state.get("best_val", math.inf))

    def stop_nonfinite(what: str, loss: float, grad_norm: float | None, at_step: int, lr: float) -> None:
        # Logged first, so that `tinylm report` diagnoses the divergence from metrics.jsonl
        # (non-finite values as strings: metrics.jsonl stays strict JSON).
        def num(x: float | None) -> float | str | None:
            return x if x is None or math.isfinite(x) else str(x)

        logger.log({"step": at_step, "loss": num(loss), "grad_norm": num(grad_norm), "lr": lr, "nonfinite": what})
        raise NonFiniteLossError(_nonfinite_message(what, grad_norm if what == "gradient norm" else loss,
                                                    at_step, out_dir))

    def model_files(d: Path) -> None:  # full weights: the checkpoint doubles as a model directory
        if getattr(raw_model, "lora_settings", None) is None and hasattr(raw_model, "config"):
            raw_model.config.save_pretrained(str(d))
            if getattr(raw_model, "generation_config", None) is not None:
                raw_model.generation_config.save_pretrained(str(d))
            if tokenizer is not None:
                save_pretrained_portable(tokenizer, d)

    def save(at_step: int) -> None:
        if not master:
            return
        path = save_checkpoint(out_dir, at_step, raw_model, optimizer, {
            "step": at_step, "tokens_seen": tokens_seen, "elapsed_s": elapsed_before + time.time() - t_start,
            "data": train_it.state_dict(), "scaler": scaler.state_dict() if use_scaler else {},
            "total_steps": total_steps, "world_size": world, "best_val": best_val,
        }, config_yaml, cfg.keep_last, model_files)
        if getattr(raw_model, "lora_settings", None) is not None:  # the adapter alone, loadable by PEFT
            from tinylm.lora import save_adapter
            save_adapter(raw_model, path, raw_model.lora_settings.get("base_model", ""))

    try:
        while True:
            elapsed = elapsed_before + time.time() - t_start
            over_budget = budget_s > 0 and elapsed >= budget_s
            if total_steps and step >= total_steps:
                break
            lr = lr_at(step, cfg, total_steps, elapsed / budget_s if budget_s else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr

            stats, extra, data_s = accumulate_gradients(
                objective, fwd_model, (next(train_stream) for _ in range(cfg.grad_accum)), cfg.grad_accum,
                device, amp, scaler, micro_scale, ddp=world > 1)
            win_data += data_s
            stats[3] = float(over_budget)
            if world > 1:
                torch.distributed.all_reduce(stats)
            total_loss, n_total = float(stats[0]), float(stats[1])
            if stats[3] > 0:  # any rank over its time budget -> all stop together
                optimizer.zero_grad(set_to_none=True)
                say(f"time budget of {cfg.time_budget_min} min reached at step {step}")
                break
            if n_total == 0:
                optimizer.zero_grad(set_to_none=True)
                say(f"warning: step {step + 1} had no supervised items (all labels -100); skipped")
                step += 1
                continue
            loss = total_loss / n_total
            if not math.isfinite(loss):
                stop_nonfinite("loss", loss, None, step + 1, lr)

            scaler.unscale_(optimizer)
            grad_norm = finish_gradients(params, n_total, world, micro_scale, cfg.grad_clip)
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm) and not use_scaler:
                stop_nonfinite("gradient norm", loss, grad_norm, step + 1, lr)
            # fp16: GradScaler skips a step whose gradients overflowed and lowers its scale; that is
            # routine, not divergence, so it is logged as amp_overflow rather than an infinite norm.
            overflow = use_scaler and not math.isfinite(grad_norm)
            scaler.step(optimizer)  # with fp16, skipped automatically when grads overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if is_moe:
                raw_model.update_expert_bias()
            step += 1
            tokens_seen += int(stats[2])
            win_tokens += int(stats[2])
            win_steps += 1
            last_loss = loss

            done = bool(total_steps) and step >= total_steps
            if step % cfg.log_every == 0 or done or step == 1:
                now = time.time()
                elapsed = elapsed_before + now - t_start
                tps = win_tokens / max(now - win_t, 1e-9)
                if total_steps:
                    eta = (now - win_t) / max(win_steps, 1) * (total_steps - step)
                else:
                    eta = budget_s - elapsed
                row = {"step": step, "loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tps, 1),
                       "grad_norm": None if overflow else round(grad_norm, 4), "tokens_seen": tokens_seen,
                       "elapsed_s": round(elapsed, 2), "peak_mem_mb": round(peak_memory_mb(device), 1),
                       "data_ms": round(1000 * win_data / max(win_steps, 1), 2)}
                if overflow:
                    row["amp_overflow"] = True
                row.update({k: round(v, 6) for k, v in extra.items()})
                if is_moe and master:
                    row["expert_load"] = raw_model.moe_load_stats(reset=True)
                    row["expert_load_max"] = round(max(max(v) for v in row["expert_load"].values()), 4)
                say(progress_line(row, total_steps, eta))
                logger.log(row)
                win_t, win_tokens, win_data, win_steps = time.time(), 0, 0.0, 0

            t_side = time.time()  # eval / samples / saves are not counted in tokens/s
            if (cfg.eval_every and step % cfg.eval_every == 0) or done:
                val = evaluate(objective, fwd_model, cfg, device, autocast_dtype, rank, world)
                if val is not None:
                    last_val = val
                    say(f"step {step} | val_loss {val:.4f}")
                    logger.log({"step": step, "val_loss": round(val, 6)})
                    if val < best_val:
                        best_val = val
                        if master and cfg.keep_best:  # survives keep_last's pruning (overfitting runs)
                            save_final(raw_model, tokenizer, out_dir, "best", {"step": step, "val_loss": val})
                if master and hasattr(objective, "validation_metrics"):  # e.g. GRPO's held-out reward
                    vm = objective.validation_metrics(raw_model)
                    if vm:
                        say(f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in vm.items()))
                        logger.log({"step": step, **{k: round(v, 6) for k, v in vm.items()}})
            if master and cfg.sample_prompts and ((cfg.sample_every and step % cfg.sample_every == 0) or done):
                for prompt, text in generate_samples(objective, raw_model, tokenizer, cfg, device, autocast_dtype):
                    say(f"  sample | {prompt!r} -> {text!r}")
                    logger.log({"step": step, "sample_prompt": prompt, "sample": text})
                    logger.log_text("samples", f"{prompt} -> {text}", step)
            if (cfg.save_every and step % cfg.save_every == 0) or done:
                save(step)
            win_t += time.time() - t_side
    finally:
        logger.close()
    # Stopped by max_steps or the time budget: make sure the last state is saved, then the final model.
    if master:
        if latest_checkpoint(out_dir) is None or int(latest_checkpoint(out_dir).name.split("_")[1]) != step:
            save(step)
        final = save_final(raw_model, tokenizer, out_dir)
        say(f"done: {step} steps, {tokens_seen:,} tokens, final loss {last_loss:.4f}"
            + (f", val_loss {last_val:.4f}" if last_val is not None else "") + f" -> {final}")
    if world > 1:
        torch.distributed.barrier()
    return {"step": step, "loss": last_loss, "val_loss": last_val, "tokens_seen": tokens_seen,
            "out_dir": str(out_dir), "final": str(out_dir / "final")}


def _nonfinite_message(what: str, value: float, step: int, out_dir: Path) -> str:
    from tinylm.checkpoint import latest_checkpoint

    last = latest_checkpoint(out_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
    return (f"non-finite {what} ({value}) at step {step}: stopped before applying it; {kept}. "
            "Try a lower lr, warmup_steps, grad_clip=1.0 or dtype=bf16/fp32, then resume=true.")


# -- command line --------------------------------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except NonFiniteLossError as e:
        print(f"tinylm train: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML recipe (pretrain, sft, ...)",
                       description="Train with a YAML recipe plus dotted key=value overrides, e.g. "
                                   "`tinylm train recipes/pretrain.yaml lr=3e-4 max_steps=100 data.train=x.jsonl`. "
                                   "Multi-GPU: `torchrun --nproc_per_node N -m tinylm train CONFIG`.")
    p.add_argument("config", help="YAML recipe (see recipes/ and docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, values parsed as YAML")
    p.set_defaults(func=_cmd_train)
