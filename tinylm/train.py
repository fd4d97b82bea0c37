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
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from tinylm.models.hf_compat import enable_checkpointing
from tinylm.training import deepspeed_zero
from tinylm.training.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    remove_unfinished_saves,
    resume_checkpoint,
    save_checkpoint,
    write_model_files,
)
from tinylm.training.loop_parts import (
    accumulate_gradients,
    autocast_settings,
    build_optimizer,
    evaluate,
    finish_gradients,
    generate_samples,
    keep_freed_memory_in_heap,
    lr_at,
    setup_distributed,
)
from tinylm.training.metrics import MetricsLogger, peak_memory_mb, progress_line
from tinylm.training.objectives import apply_adapters
from tinylm.training.parallel import (
    agree,
    forward_is_collective,
    is_fsdp,
    is_sharded_checkpoint,
    load_sharded,
    memory_report,
    prepare_optimizer_save,
    save_model_dir,
    save_sharded,
    shard_model,
    shard_optimizer,
)
from tinylm.training.trainconfig import TrainConfig, config_to_dict, load_config, save_config


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the step was not applied."""


# -- setup helpers -------------------------------------------------------------------------------

def make_objective(cfg: TrainConfig) -> Any:
    """The objective for `cfg.stage` (tinylm/training/objectives.py documents the interface).

    One branch per stage; imports are lazy so `tinylm train` only loads what the stage needs.
    """
    stage = cfg.stage
    if stage in ("pretrain", "sft"):
        from tinylm.training.objectives import LMObjective, SFTObjective
        return SFTObjective(cfg) if stage == "sft" else LMObjective(cfg)
    # Post-training stages (their modules define the classes; imports are lazy):
    if stage == "dpo":
        from tinylm.posttrain.dpo import DPOObjective
        return DPOObjective(cfg)
    if stage == "distill":
        from tinylm.posttrain.distill import DistillObjective
        return DistillObjective(cfg)
    if stage == "reason":
        from tinylm.posttrain.reasoning import ReasonObjective
        return ReasonObjective(cfg)
    if stage == "grpo":
        from tinylm.posttrain.grpo import GRPOObjective
        return GRPOObjective(cfg)
    if stage == "reward":
        from tinylm.posttrain.reward import RewardObjective
        return RewardObjective(cfg)
    if stage == "ppo":
        from tinylm.posttrain.ppo import PPOObjective
        return PPOObjective(cfg)
    if stage == "vlm":
        from tinylm.posttrain.vlm_train import VisionObjective
        return VisionObjective(cfg)
    raise ValueError(f"stage {stage!r} has no objective "
                     "(known: pretrain, sft, dpo, distill, reason, grpo, reward, ppo)")


# -- the loop ------------------------------------------------------------------------------------
# train() reads top to bottom: setup (which resumes), then per step train_step, log_step, side_work,
# then finish. `Run` is what the phases read; `Loop` holds the counters they advance.
@dataclass
class Run:
    """Everything the phases of one run read, built once by `setup`."""

    cfg: TrainConfig
    rank: int
    world: int
    master: bool                         # rank 0: logs, samples, saves
    device: torch.device
    say: Callable[..., Any]              # `log` on rank 0, silent on the others
    out_dir: Path
    config_yaml: str                     # the resolved config, copied into every checkpoint
    model: torch.nn.Module               # unwrapped: saved, sampled, MoE-balanced
    fwd_model: torch.nn.Module           # forward passes: `model`, or its DDP / torch.compile wrapper
    tokenizer: Any
    objective: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_scaler: bool
    autocast_dtype: torch.dtype | None
    amp: Callable[[], Any]               # autocast context (or a null one) for forward passes
    micro_scale: float                   # constant loss scale: keeps summed losses O(1) for fp16
    params: list[torch.nn.Parameter]     # the trainable ones
    is_moe: bool
    train_it: Any                        # resumable batch source: its state_dict() goes into checkpoints
    train_stream: Iterator[dict[str, Any]]
    total_steps: int                     # 0 = until the time budget
    budget_s: float                      # 0 = no time budget
    logger: Any
    engine: Any = None                   # parallel=deepspeed: the DeepSpeed engine (tinylm/training/deepspeed_zero.py)


@dataclass
class Loop:
    """The counters the steps advance; a checkpoint's trainer_state.pt restores them."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0          # seconds trained by the processes this run resumed from
    best_val: float = math.inf
    last_loss: float = math.nan
    last_val: float | None = None
    t_start: float = 0.0                 # when this process took its first step
    win_t: float = 0.0                   # the logging window (tokens/s, data time, ETA since the last row)
    win_tokens: int = 0
    win_data: float = 0.0
    win_steps: int = 0

    def elapsed(self, now: float | None = None) -> float:
        return self.elapsed_before + (time.time() if now is None else now) - self.t_start

    def new_window(self) -> None:
        self.win_t, self.win_tokens, self.win_data, self.win_steps = time.time(), 0, 0.0, 0


@dataclass
class Step:
    """What one call of `train_step` did, for `log_step`."""

    status: str                          # "applied", "skipped" (no supervised items) or "out_of_time"
    lr: float = 0.0
    loss: float = math.nan
    grad_norm: float = math.nan
    overflow: bool = False               # fp16: GradScaler skipped the update (routine, not divergence)
    extra: dict[str, float] = field(default_factory=dict)


def train(cfg: TrainConfig, objective: Any = None, log: Any = print) -> dict[str, Any]:
    """Run one training job. Returns a summary (final loss, steps, paths). See module docstring."""
    run, loop = setup(cfg, objective, log)
    announce(run)
    loop.t_start = time.time()
    loop.new_window()
    try:
        while not (run.total_steps and loop.step >= run.total_steps):
            step = train_step(run, loop)
            if step.status == "out_of_time":
                break
            if step.status == "skipped":
                continue
            done = bool(run.total_steps) and loop.step >= run.total_steps
            log_step(run, loop, step, done)
            side_work(run, loop, done)
    finally:
        run.logger.close()
    return finish(run, loop)


# -- setup and resume

def setup(cfg: TrainConfig, objective: Any, log: Any) -> tuple[Run, Loop]:
    """Everything before the first step, in an order that matters: a checkpoint's RNG state is restored
    after the model init has drawn from the seed, and before the data order is drawn."""
    import yaml

    cfg.validate()
    rank, _, world, device = setup_distributed(cfg)
    if device.type == "cpu":
        keep_freed_memory_in_heap()
    say = log if rank == 0 else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)
    resume_from = resume_checkpoint(cfg.resume, out_dir, say)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        for p in remove_unfinished_saves(out_dir):
            say(f"removed {p}: the unfinished save of a process that was killed")
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)

    model, tokenizer, objective = build_model(cfg, objective, device)
    model = shard_model(model, cfg, device, world)  # parallel=fsdp: FSDP2 in place (tinylm/training/parallel.py)
    optimizer = shard_optimizer(build_optimizer(model, cfg, device), cfg, world)  # parallel=zero1
    engine = deepspeed_zero.wrap(model, optimizer, cfg) if deepspeed_zero.uses_deepspeed(cfg, world) else None
    autocast_dtype, use_scaler = autocast_settings(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    loop, data_state = restore(resume_from, model, optimizer, scaler, say, engine)

    fwd_model: torch.nn.Module = model if engine is None else engine
    if world > 1 and not is_fsdp(model) and engine is None:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd_model = torch.compile(fwd_model, dynamic=False)  # dynamic shapes hit an inductor CPU bug (torch 2.13)
    train_it = objective.batches("train", rank, world)
    if data_state is not None:
        train_it.load_state_dict(data_state)
    total_steps = cfg.max_steps
    if total_steps == 0 and cfg.epochs > 0:  # a time budget, if set, is an extra cap
        total_steps = max(1, math.ceil(cfg.epochs * math.ceil(len(train_it) / cfg.grad_accum)))
    logger = MetricsLogger(out_dir, cfg.report_to, cfg.run_name, config_to_dict(cfg), enabled=rank == 0,
                           resume_step=loop.step if resume_from is not None else None)
    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    run = Run(cfg=cfg, rank=rank, world=world, master=rank == 0, device=device, say=say, out_dir=out_dir,
              config_yaml=config_yaml, model=model, fwd_model=fwd_model, tokenizer=tokenizer, objective=objective,
              optimizer=optimizer, scaler=scaler, use_scaler=use_scaler, autocast_dtype=autocast_dtype, amp=amp,
              micro_scale=1.0 / (cfg.batch_size * cfg.seq_len),
              params=[p for p in model.parameters() if p.requires_grad],
              is_moe=callable(getattr(model, "update_expert_bias", None))
              and bool(getattr(model.config, "num_experts", 0)),
              train_it=train_it, train_stream=iter(train_it), total_steps=total_steps,
              budget_s=cfg.time_budget_min * 60.0, logger=logger, engine=engine)
    return run, loop


def build_model(cfg: TrainConfig, objective: Any, device: torch.device) -> tuple[torch.nn.Module, Any, Any]:
    """(model on `device` in train mode, with adapters if asked; tokenizer; the stage's objective, set up)."""
    from tinylm.models.loading import load_model

    torch.manual_seed(cfg.seed)
    if cfg.stage == "vlm":  # vision tower + projector + LM (tinylm/posttrain/vlm_train.py)
        from tinylm.posttrain.vlm_train import load_vlm_for_training
        model, tokenizer = load_vlm_for_training(cfg)
    else:
        model, tokenizer = load_model(cfg.model, dtype="fp32", tokenizer=cfg.tokenizer or None, seed=cfg.seed)
    model = apply_adapters(model, cfg).to(device)
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    model.train()
    objective = objective if objective is not None else make_objective(cfg)
    objective.setup(model, tokenizer, cfg, device)
    return model, tokenizer, objective


def restore(resume_from: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, say: Callable[..., Any], engine: Any = None) -> tuple[Loop, Any]:
    """Weights, optimizer, RNG, GradScaler and counters from a checkpoint (fresh counters without one).
    Also returns the saved data-iterator position, or None."""
    if resume_from is None:
        return Loop(), None
    if engine is not None or deepspeed_zero.is_deepspeed_checkpoint(resume_from):
        if engine is None or not deepspeed_zero.is_deepspeed_checkpoint(resume_from):
            raise ValueError(f"resume={resume_from}: parallel=deepspeed checkpoints resume with parallel=deepspeed "
                             "(same world size) only, and parallel=deepspeed resumes only from them")
        state = deepspeed_zero.load(resume_from, engine, torch.distributed.get_world_size())
    elif is_sharded_checkpoint(resume_from):  # parallel=fsdp, saved at any world size
        state = load_sharded(resume_from, model, optimizer)
    elif is_fsdp(model):
        raise ValueError(f"resume={resume_from}: parallel=fsdp resumes from sharded checkpoints only; "
                         "this one was saved with parallel=ddp/zero1 (resume it with those)")
    else:
        state = load_checkpoint(resume_from, model, optimizer)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    loop = Loop(step=int(state["step"]), tokens_seen=int(state["tokens_seen"]),
                elapsed_before=float(state.get("elapsed_s", 0.0)), best_val=float(state.get("best_val", math.inf)))
    say(f"resumed from {resume_from} at step {loop.step}")
    return loop, state.get("data")


def announce(run: Run) -> None:
    """The start line: what trains, where, in which precision, on which batch, for how long."""
    cfg = run.cfg
    sizes = f"{sum(p.numel() for p in run.params) / 1e6:.2f}M trainable params"
    if cfg.lora.enabled:  # trainable / total params, and the 4-bit storage for QLoRA
        from tinylm.models.lora import size_summary
        sizes = size_summary(run.model)
    run.say(f"stage {cfg.stage} | model {cfg.model} | {sizes} | device {run.device} x{run.world}"
            f"{' ' + cfg.parallel if run.world > 1 else ''} | dtype {run.autocast_dtype or torch.float32} | global batch "
            f"{cfg.batch_size * cfg.grad_accum * run.world} rows x {cfg.seq_len} | "
            f"steps {run.total_steps or 'until time budget'}")


# -- one step

def train_step(run: Run, loop: Loop) -> Step:
    """Set the lr, forward/backward over grad_accum micro-batches, then `apply_update`.

    A rank past its time budget still joins the all-reduce, so that all ranks stop at the same step.
    """
    cfg = run.cfg
    elapsed = loop.elapsed()
    lr = lr_at(loop.step, cfg, run.total_steps, elapsed / run.budget_s if run.budget_s else 0.0)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = (next(run.train_stream) for _ in range(cfg.grad_accum))
    if run.engine is not None:  # parallel=deepspeed: its engine owns backward (tinylm/training/deepspeed_zero.py)
        stats, extra, data_s = accumulate_gradients(run.objective, run.engine, batches, cfg.grad_accum, run.device,
                                                    run.amp, micro_scale=run.micro_scale,
                                                    backward=deepspeed_zero.engine_backward(run.engine, cfg.grad_accum))
    else:
        stats, extra, data_s = accumulate_gradients(run.objective, run.fwd_model, batches, cfg.grad_accum,
                                                    run.device, run.amp, run.scaler, run.micro_scale,
                                                    ddp=run.world > 1 and not is_fsdp(run.model))
    loop.win_data += data_s
    stats[3] = float(run.budget_s > 0 and elapsed >= run.budget_s)
    if run.world > 1:
        torch.distributed.all_reduce(stats)
    total_loss, n_total = float(stats[0]), float(stats[1])
    if stats[3] > 0:  # any rank over its time budget -> all stop together
        run.optimizer.zero_grad(set_to_none=True)
        run.say(f"time budget of {cfg.time_budget_min} min reached at step {loop.step}")
        return Step("out_of_time")
    if n_total == 0:
        run.optimizer.zero_grad(set_to_none=True)
        if run.engine is not None:  # DeepSpeed counts micro-steps: close the step (a zero gradient)
            deepspeed_zero.finish_step(run.engine, 1.0, 1, 1.0)
        run.say(f"warning: step {loop.step + 1} had no supervised items (all labels -100); skipped")
        loop.step += 1
        return Step("skipped")
    loss = total_loss / n_total
    if not math.isfinite(loss):
        stop_nonfinite(run, "loss", loss, None, loop.step + 1, lr)
    grad_norm, overflow = apply_update(run, n_total, loss, loop.step + 1, lr)
    loop.step += 1
    loop.tokens_seen += int(stats[2])
    loop.win_tokens += int(stats[2])
    loop.win_steps += 1
    loop.last_loss = loss
    return Step("applied", lr, loss, grad_norm, overflow, extra)


def apply_update(run: Run, n_total: float, loss: float, at_step: int, lr: float) -> tuple[float, bool]:
    """Token-mean gradient, clip, AdamW, MoE expert bias. Returns (gradient norm, fp16 overflow).

    fp16: GradScaler skips a step whose gradients overflowed and lowers its scale; that is routine,
    not divergence, so it is reported as an overflow instead of stopping on an infinite norm.
    """
    if run.engine is not None:  # parallel=deepspeed: its engine scales, clips and steps
        grad_norm = deepspeed_zero.finish_step(run.engine, n_total, run.world, run.micro_scale)
        if run.is_moe:
            run.model.update_expert_bias()
        return grad_norm, False
    run.scaler.unscale_(run.optimizer)
    grad_norm = finish_gradients(run.params, n_total, run.world, run.micro_scale, run.cfg.grad_clip)
    if not math.isfinite(grad_norm) and not run.use_scaler:
        stop_nonfinite(run, "gradient norm", loss, grad_norm, at_step, lr)
    overflow = run.use_scaler and not math.isfinite(grad_norm)
    run.scaler.step(run.optimizer)  # with fp16, skipped automatically when grads overflowed
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.is_moe:
        run.model.update_expert_bias()
    return grad_norm, overflow


def stop_nonfinite(run: Run, what: str, loss: float, grad_norm: float | None, at_step: int, lr: float) -> NoReturn:
    """Log the non-finite value, then raise NonFiniteLossError (the step is not applied).

    Logged first, so that `tinylm report` diagnoses the divergence from metrics.jsonl (non-finite
    values as strings: metrics.jsonl stays strict JSON).
    """
    def num(x: float | None) -> float | str | None:
        return x if x is None or math.isfinite(x) else str(x)

    run.logger.log({"step": at_step, "loss": num(loss), "grad_norm": num(grad_norm), "lr": lr, "nonfinite": what})
    raise NonFiniteLossError(_nonfinite_message(what, grad_norm if what == "gradient norm" else loss,
                                                at_step, run.out_dir))


# -- logging and side work

def log_step(run: Run, loop: Loop, step: Step, done: bool) -> None:
    """Progress line + metrics row every log_every steps, and at the first and the last step."""
    if not (loop.step % run.cfg.log_every == 0 or done or loop.step == 1):
        return
    if loop.step == 1 and run.world > 1:  # memory per rank, once (every rank takes part)
        mem = memory_report(run.model, run.optimizer, run.world, run.engine)
        run.say("memory per rank (param/grad/optim MB, peak RSS MB): " + " | ".join(
            f"{m['param_bytes'] / 2**20:.1f}/{m['grad_bytes'] / 2**20:.1f}/{m['optim_bytes'] / 2**20:.1f}, "
            f"{m['peak_rss_mb']:.0f}" for m in mem))
        run.logger.log({"step": loop.step, "memory_per_rank": mem})
    now = time.time()
    elapsed = loop.elapsed(now)
    if run.total_steps:
        eta = (now - loop.win_t) / max(loop.win_steps, 1) * (run.total_steps - loop.step)
    else:
        eta = run.budget_s - elapsed
    row = {"step": loop.step, "loss": round(step.loss, 6), "lr": step.lr,
           "tokens_per_s": round(loop.win_tokens / max(now - loop.win_t, 1e-9), 1),
           "grad_norm": None if step.overflow else round(step.grad_norm, 4), "tokens_seen": loop.tokens_seen,
           "elapsed_s": round(elapsed, 2), "peak_mem_mb": round(peak_memory_mb(run.device), 1),
           "data_ms": round(1000 * loop.win_data / max(loop.win_steps, 1), 2)}
    if step.overflow:
        row["amp_overflow"] = True
    row.update({k: round(v, 6) for k, v in step.extra.items()})
    if run.is_moe and run.master:
        row["expert_load"] = run.model.moe_load_stats(reset=True)
        row["expert_load_max"] = round(max(max(v) for v in row["expert_load"].values()), 4)
    run.say(progress_line(row, run.total_steps, eta))
    run.logger.log(row)
    loop.new_window()


def side_work(run: Run, loop: Loop, done: bool) -> None:
    """Validation, samples and checkpoints when due (all at the last step); not counted in tokens/s."""
    cfg, step = run.cfg, loop.step
    t_side = time.time()
    if (cfg.eval_every and step % cfg.eval_every == 0) or done:
        validate(run, loop)
    if (run.master or forward_is_collective(run.model)) and cfg.sample_prompts and (  # FSDP2/ZeRO-3: all ranks
            (cfg.sample_every and step % cfg.sample_every == 0) or done):
        for prompt, text in generate_samples(run.objective, run.model, run.tokenizer, cfg, run.device,
                                             run.autocast_dtype):
            run.say(f"  sample | {prompt!r} -> {text!r}")
            run.logger.log({"step": step, "sample_prompt": prompt, "sample": text})
            run.logger.log_text("samples", f"{prompt} -> {text}", step)
    if (cfg.save_every and step % cfg.save_every == 0) or done:
        save(run, loop)
    loop.win_t += time.time() - t_side


def validate(run: Run, loop: Loop) -> None:
    """Validation loss on all ranks (a new best is copied to out_dir/best), then the objective's own
    held-out metrics (e.g. GRPO's reward) on rank 0."""
    val = evaluate(run.objective, run.fwd_model, run.cfg, run.device, run.autocast_dtype, run.rank, run.world)
    if val is not None:
        loop.last_val = val
        run.say(f"step {loop.step} | val_loss {val:.4f}")
        run.logger.log({"step": loop.step, "val_loss": round(val, 6)})
        if val < loop.best_val:
            loop.best_val = val
            if run.cfg.keep_best:  # survives keep_last's pruning (overfitting runs); rank 0 writes
                save_model_dir(run.model, run.tokenizer, run.out_dir, run.cfg, run.rank, "best",
                               {"step": loop.step, "val_loss": val})
    if (run.master or forward_is_collective(run.model)) and hasattr(run.objective, "validation_metrics"):
        vm = run.objective.validation_metrics(run.model)
        if vm:
            run.say(f"step {loop.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in vm.items()))
            run.logger.log({"step": loop.step, **{k: round(v, 6) for k, v in vm.items()}})


def save(run: Run, loop: Loop) -> None:
    """Checkpoint the current step on rank 0: weights, optimizer, data position, counters, RNG, GradScaler.
    parallel=fsdp: every rank writes its shards (tinylm/training/parallel.py); zero1: gathered to rank 0 first."""
    if run.world > 1:
        prepare_optimizer_save(run.optimizer)
    state = {"step": loop.step, "tokens_seen": loop.tokens_seen, "elapsed_s": loop.elapsed(),
             "data": run.train_it.state_dict(), "scaler": run.scaler.state_dict() if run.use_scaler else {},
             "total_steps": run.total_steps, "world_size": run.world, "best_val": loop.best_val}
    if run.engine is not None:  # every rank writes its ZeRO partitions
        deepspeed_zero.save(run.out_dir, loop.step, run.engine, state, run.config_yaml, run.cfg.keep_last, run.rank)
        return
    if run.cfg.parallel == "fsdp":
        save_sharded(run.out_dir, loop.step, run.model, run.optimizer, state, run.config_yaml, run.cfg.keep_last,
                     run.rank, run.world)
        return
    if not run.master:
        return
    save_checkpoint(run.out_dir, loop.step, run.model, run.optimizer, state, run.config_yaml, run.cfg.keep_last,
                    lambda d: write_model_files(run.model, run.tokenizer, d))


# -- finish

def finish(run: Run, loop: Loop) -> dict[str, Any]:
    """Checkpoint the last step if no save covered it (time budget), write final/, wait for all ranks."""
    last = latest_checkpoint(run.out_dir) if run.master else None
    if agree(run.master and (last is None or checkpoint_step(last) != loop.step), run.world):
        save(run, loop)  # a collective under zero1 / fsdp
    final = save_model_dir(run.model, run.tokenizer, run.out_dir, run.cfg, run.rank)
    if run.master:
        run.say(f"done: {loop.step} steps, {loop.tokens_seen:,} tokens, final loss {loop.last_loss:.4f}"
                + (f", val_loss {loop.last_val:.4f}" if loop.last_val is not None else "") + f" -> {final}")
    if run.world > 1:
        torch.distributed.barrier()
    return {"step": loop.step, "loss": loop.last_loss, "val_loss": loop.last_val, "tokens_seen": loop.tokens_seen,
            "out_dir": str(run.out_dir), "final": str(run.out_dir / "final")}


def _nonfinite_message(what: str, value: float, step: int, out_dir: Path) -> str:
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
