"""`parallel: deepspeed`: DeepSpeed ZeRO stages 1/2/3 (Rajbhandari et al. 2020) inside tinylm's one loop.

Why a separate engine next to `zero1` / `fsdp` (tinylm/training/parallel.py): users arrive with DeepSpeed configs
(offload_optimizer, offload_param, NVMe, ...). Here DeepSpeed's engine owns the backward, the
(partitioned) gradient buffers, the averaging over ranks, clipping and the optimizer step; tinylm
keeps the data, the objective, the lr schedule, logging and checkpoints.

The gradient scale. tinylm's loop wants the token-mean gradient of a whole optimizer step,
d(sum of item losses / N), N = the items of all micro-batches on all ranks, known only after the last
micro-batch (tinylm/train.py). DeepSpeed averages gradients over the W ranks and keeps them
partitioned (ZeRO-2/3: not `p.grad`), so they cannot be rescaled by hand. But its optimizer divides
the gradients by its loss scale before clipping and stepping (the fp16 machinery, a static 1 in fp32),
and `override_loss_scale` sets that divisor. So each micro-batch back-propagates loss_sum * c
(`scale_wrt_gas=False`: no 1/G), and before the boundary step the loss scale becomes S = c * N / W:

    (1/W) sum_ranks sum_micro d(loss_sum * c) / S  =  d(sum loss / N)

(First tried: run all G forwards, all-reduce N, then back-propagate loss_sum * W * G / N. Exact for
ZeRO-1/2, but ZeRO-3 lost gradient when several micro-batch graphs were alive: norms ~0.5x.)

Checkpoints: `engine.save_checkpoint` (every rank writes its ZeRO partitions) into a temporary
directory that rank 0 completes (trainer state, manifest) and renames, as the other modes do. DeepSpeed's
partitioned optimizer state resumes at the same world size. `final/` is an ordinary safetensors
model directory (ZeRO-3: the partitions are gathered on rank 0 first).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DS_DIR = "deepspeed"
DS_TAG = "state"
LOOP_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler")


def uses_deepspeed(cfg: Any, world: int) -> bool:
    """parallel=deepspeed under torchrun (one process: the plain loop, as for every mode)."""
    return cfg.parallel == "deepspeed" and world > 1


def ds_config(cfg: Any) -> dict[str, Any]:
    """The DeepSpeed config: batch, accumulation and clipping from tinylm's config, the ZeRO stage from
    `deepspeed.stage`, everything else passed through from `deepspeed.config` (e.g. offload_optimizer)."""
    extra = dict(cfg.deepspeed.config or {})
    for key in LOOP_OWNED:
        if key in extra:
            raise ValueError(f"config: deepspeed.config.{key} is set by tinylm (batch_size, grad_accum, grad_clip, "
                             "lr, AdamW settings); remove it")
    zero = {**extra.pop("zero_optimization", {}), "stage": cfg.deepspeed.stage}
    return {**extra, "train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1}


def wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any) -> Any:
    """`deepspeed.initialize` around tinylm's model and AdamW (the lr is still set on `optimizer`'s groups:
    DeepSpeed steps it on its flat partitions, keeping the groups and their weight decay)."""
    try:
        import deepspeed
    except ImportError:
        raise ValueError("config: parallel=deepspeed needs DeepSpeed: pip install -c constraints.txt deepspeed"
                         ) from None
    if cfg.dtype == "fp16":  # tinylm's GradScaler is not DeepSpeed's loss scaler
        raise ValueError("config: parallel=deepspeed does not take dtype=fp16; use dtype=bf16 or fp32")
    if cfg.deepspeed.stage == 3 and cfg.stage == "grpo" and cfg.grpo.tools:  # as parallel.refuse_unsynced_rollouts
        raise ValueError("config: deepspeed.stage=3 does not support agentic RL (grpo.tools set): each rank runs "
                         "a different number of tool turns and sharded forwards must run in lockstep; "
                         "use deepspeed.stage 1 or 2 (or parallel=ddp)")
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # reuses the process group
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg))
    return engine


def is_zero3(model: torch.nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 partitioned `model`'s weights (its forward is a collective)."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


# -- one optimizer step ----------------------------------------------------------------------------

def engine_backward(engine: Any, n_micro: int) -> Any:
    """The `backward(scaled_loss, micro)` of loop_parts.accumulate_gradients under DeepSpeed:
    `engine.backward(loss_sum * micro_scale)` (no 1/G: scale_wrt_gas=False), then `engine.step()` after
    all but the last micro-batch, whose step (the accumulation boundary) is `finish_step`'s."""

    def backward(scaled: torch.Tensor, micro: int) -> None:
        engine.backward(scaled, scale_wrt_gas=False)  # the boundary one reduces (ZeRO-2/3)
        if micro < n_micro - 1:
            engine.step()  # not a boundary: only counts the micro-step

    return backward


def finish_step(engine: Any, n_total: float, world: int, micro_scale: float) -> float:
    """The boundary step: DeepSpeed divides the rank-averaged d(sum loss * c) by its loss scale
    S = c * N / W (module docstring), clips and steps. Returns the gradient norm before clipping."""
    engine.optimizer.override_loss_scale(micro_scale * n_total / world)
    engine.step()
    engine.optimizer.override_loss_scale(1.0)  # DeepSpeed's backward multiplies the loss by it
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


# -- memory per rank -------------------------------------------------------------------------------

def state_bytes(engine: Any, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes: module weights (ZeRO-3: its partition), fp32 master partitions + AdamW moments
    (optimizer), gradients (ZeRO-2/3: the partition; ZeRO-1: full, reduce-scattered at the boundary)."""
    stage = engine.zero_optimization_stage()
    params = [p for p in engine.module.parameters()]
    local = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params]
    param_bytes = sum(t.numel() * t.element_size() for t in local)
    zo = engine.optimizer  # DeepSpeed's flat fp32 master partitions (ZeRO-1/2 and ZeRO-3 name them apart)
    masters = getattr(zo, "single_partition_of_fp32_groups", None) or getattr(zo, "fp32_partitioned_groups_flat", [])
    master_bytes = sum(p.numel() * p.element_size() for p in masters)
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    full_grads = sum(p.numel() * 4 for p in params if p.requires_grad and not hasattr(p, "ds_tensor"))
    return {"param_bytes": param_bytes, "grad_bytes": master_bytes if stage >= 2 else full_grads,
            "optim_bytes": master_bytes + moments}


# -- checkpoints -----------------------------------------------------------------------------------

def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DS_DIR).is_dir()


def save(out_dir: str | Path, step: int, engine: Any, trainer_state: dict[str, Any], config_yaml: str,
         keep_last: int, rank: int) -> Path:
    """Checkpoint `step` with `engine.save_checkpoint`, atomically (a collective: every rank calls it)."""
    from tinylm.training.checkpoint import checkpoint_dir, commit_sharded_checkpoint

    final = checkpoint_dir(out_dir, step)
    tmp = final.parent / f".tmp_{final.name}_ds"  # cleared by remove_unfinished_saves after a crash
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG)  # each rank its partitions
    dist.barrier()
    if rank == 0:
        commit_sharded_checkpoint(tmp, final, out_dir, step, config_yaml, trainer_state, keep_last)
    dist.barrier()
    return final


def load(path: str | Path, engine: Any, world: int) -> dict[str, Any]:
    """Weights, ZeRO optimizer partitions and RNG from a checkpoint of `save`; returns its trainer state."""
    from tinylm.training.checkpoint import set_rng_state

    path = Path(path)
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if int(trainer.get("world_size", world)) != world:
        raise ValueError(f"{path}: a parallel=deepspeed checkpoint saved by {trainer['world_size']} ranks resumes "
                         f"on {trainer['world_size']} ranks, not {world} (DeepSpeed's optimizer partitions)")
    loaded, _ = engine.load_checkpoint(str(path / DS_DIR), tag=DS_TAG)
    if loaded is None:
        raise ValueError(f"{path}: DeepSpeed could not load {path / DS_DIR}")
    if "rng" in trainer:
        set_rng_state(trainer["rng"])
    return trainer


def full_model_copy(model: torch.nn.Module, cfg: Any, rank: int) -> torch.nn.Module | None:
    """ZeRO-3: the weights gathered (a collective) into a freshly built model on rank 0; None elsewhere."""
    import deepspeed

    from tinylm.training.objectives import rebuilt_with_state

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if rank == 0 else None
    if rank != 0:
        return None
    return rebuilt_with_state(full, model, cfg)
