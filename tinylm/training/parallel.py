"""Scale-out on PyTorch's own engines: ZeRO-1 (ZeroRedundancyOptimizer), ZeRO-2/3 (FSDP2), sharded checkpoints.

Why: under DDP every rank holds the weights, the gradients and AdamW's two moments: 16 bytes per
parameter in fp32, so a model stops at what one GPU holds. ZeRO (Rajbhandari et al. 2020) shards
that state over the N ranks:

    parallel  engine                                       per-rank bytes / parameter
    ddp       DistributedDataParallel                      4 + 4 + 8
    zero1     DDP + torch.distributed.optim.ZeroRedundancyOptimizer   4 + 4 + 8/N   (ZeRO-1)
    fsdp      FSDP2 `fully_shard` per decoder layer + root (4 + 4 + 8)/N            (ZeRO-3;
              fsdp.reshard_after_forward=false keeps the gathered weights for the backward: ZeRO-2-like)

FSDP2 (Zhao et al. 2023, "PyTorch FSDP"; the DTensor-based `fully_shard` of torch >= 2.4) gathers a
layer's weights just before its forward/backward and reduce-scatters its gradients, so only one
layer is ever held whole. The training loop does not change: gradients come back averaged over the
ranks as under DDP, and `finish_gradients` scales and clips them the same way (the norm of sharded
gradients is reduced over the ranks: `grad_norm`).

Checkpoints (`parallel: fsdp`, any world size): every rank writes its own shards with
`torch.distributed.checkpoint` (DCP) into `step_N/dcp/`, keyed by parameter name, not by rank. DCP
re-slices them at load time, so a run saved by 2 ranks resumes on 1 or on 8 (and 1 -> 2); the data
position is kept because the batch iterator counts rows, not steps per rank (dataset.py). Atomic
as the other checkpoints: all ranks write into `.tmp_step_N_dcp`, rank 0 adds the trainer state and
the manifest (sha256 of every shard) and renames it. The final `final/` directory is an ordinary
safetensors model directory (gathered on rank 0), loadable by transformers.
Multi-node runs need `out_dir` on a filesystem every node sees (NFS, Lustre, ...).
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DCP_DIR = "dcp"


# -- process group and wrapping --------------------------------------------------------------------

def init_process_group(backend: str, device: torch.device, timeout_min: float) -> None:
    """init_process_group with a timeout: a collective waiting on a dead or hung rank fails instead of
    hanging forever; torchrun then stops the other workers (docs/distributed.md, "when a rank dies")."""
    dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None,
                            timeout=timedelta(minutes=timeout_min))


def is_fsdp(model: torch.nn.Module) -> bool:
    """True when `model` was sharded by FSDP2 (its forward and state dict are collectives)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def forward_is_collective(model: torch.nn.Module) -> bool:
    """FSDP2 or DeepSpeed ZeRO-3 weights: every rank must join each forward (samples, metrics)."""
    from tinylm.training.deepspeed_zero import is_zero3
    return is_fsdp(model) or is_zero3(model)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (tinylm and HF Llama-style models: model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"parallel=fsdp: {type(model).__name__} has no model.layers to shard")
    return list(layers)


def shard_model(model: torch.nn.Module, cfg: Any, device: torch.device, world: int) -> torch.nn.Module:
    """FSDP2 in place for parallel=fsdp under torchrun (one `fully_shard` per decoder layer, then the
    root: embeddings, final norm, lm_head). Other modes and single-process runs: the model unchanged."""
    if cfg.parallel != "fsdp" or world == 1:
        return model
    refuse_unsynced_rollouts(cfg, "parallel=fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cfg.fsdp.reshard_after_forward}
    if cfg.fsdp.mixed_precision:  # bf16 weights for compute, fp32 gradient reduction and master shards
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    pin = device.type == "cuda"  # pinned host memory needs an accelerator
    kw["offload_policy"] = CPUOffloadPolicy(pin_memory=pin) if cfg.fsdp.cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def refuse_unsynced_rollouts(cfg: Any, mode: str) -> None:
    """Sharded weights make each forward a collective. GRPO and PPO rollouts keep the ranks in step
    (tinylm/inference/sampler.py); agentic rollouts run a different number of tool turns per rank."""
    if cfg.stage == "grpo" and cfg.grpo.tools:
        raise ValueError(f"config: {mode} does not support agentic RL (grpo.tools set): each rank runs a "
                         "different number of tool turns and sharded forwards must run in lockstep; "
                         "use parallel=ddp or zero1 (or deepspeed.stage 1/2)")


def shard_optimizer(optimizer: torch.optim.Optimizer, cfg: Any, world: int) -> torch.optim.Optimizer:
    """parallel=zero1 under torchrun: the same AdamW groups, each rank keeping the state of 1/N of the
    parameters (ZeroRedundancyOptimizer broadcasts the updated weights after each step)."""
    if cfg.parallel != "zero1" or world == 1:
        return optimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups
              if g["params"]]
    d = optimizer.defaults
    extra = {k: d[k] for k in ("fused", "foreach") if d.get(k)}
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), lr=d["lr"], betas=d["betas"],
                                   eps=d["eps"], **extra)


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global gradient L2 norm before clipping (sharded gradients: reduced over the ranks); clips."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):  # DTensor: the sum of squares is partial on each rank
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def agree(flag: bool, world: int) -> bool:
    """Rank 0's `flag` on every rank (one decision before a collective save)."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, src=0)
    return bool(t.item())


# -- memory per rank -------------------------------------------------------------------------------

def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state bytes (its shards under zero1 / fsdp).

    Gradients are counted as one fp32 tensor per trainable parameter (shard): what backward allocates.
    """
    params = list(model.parameters())
    local_opt = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: this rank's AdamW
    opt = sum(_local_bytes(v) for s in local_opt.state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"param_bytes": sum(_local_bytes(p) for p in params),
            "grad_bytes": sum(_local_bytes(p) for p in params if p.requires_grad),
            "optim_bytes": opt}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int,
                  engine: Any = None) -> list[dict[str, float]]:
    """Every rank's state bytes and peak RSS, gathered (a collective; rank order)."""
    if engine is not None:  # parallel=deepspeed: ZeRO partitions (tinylm/training/deepspeed_zero.py)
        from tinylm.training.deepspeed_zero import state_bytes as ds_state_bytes
        mine = {**ds_state_bytes(engine, optimizer), "peak_rss_mb": round(peak_rss_mb(), 1)}
    else:
        mine = {**state_bytes(model, optimizer), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if world == 1:
        return [mine]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, mine)
    return out


# -- sharded checkpoints ---------------------------------------------------------------------------

def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optim"} keyed by parameter names (DTensor shards under FSDP2, full tensors otherwise)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load (even with no_dist=True); here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 trainer_state: dict[str, Any], config_yaml: str, keep_last: int, rank: int, world: int) -> Path:
    """Checkpoint `step` as DCP shards + trainer state, atomically (a collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    from tinylm.training.checkpoint import checkpoint_dir, commit_sharded_checkpoint

    final = checkpoint_dir(out_dir, step)
    tmp = final.parent / f".tmp_{final.name}_dcp"  # one name on every rank; cleared by remove_unfinished_saves
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    state = _state(model, optimizer)
    with single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp / DCP_DIR), no_dist=world == 1)  # each rank its shards
    if rank == 0:
        commit_sharded_checkpoint(tmp, final, out_dir, step, config_yaml, trainer_state, keep_last)
    if world > 1:
        dist.barrier()
    return final


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 restore_rng: bool = True) -> dict[str, Any]:
    """Load a DCP checkpoint saved at any world size into this run's layout; returns its trainer state.

    The template comes from this run's own (possibly sharded) model and optimizer: DCP reads the
    slices each rank needs. Works without a process group too (a single process takes everything).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from tinylm.training.checkpoint import set_rng_state

    path = Path(path)
    if getattr(optimizer, "optim", None) is not None:  # ZeroRedundancyOptimizer has no name-keyed state
        raise ValueError(f"{path}: a sharded (parallel=fsdp) checkpoint resumes with parallel=fsdp or ddp, "
                         "not zero1")
    state = _state(model, optimizer)
    with single_process_quiet():
        dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if restore_rng and "rng" in trainer:
        set_rng_state(trainer["rng"])
    return trainer


def prepare_optimizer_save(optimizer: torch.optim.Optimizer) -> None:
    """ZeroRedundancyOptimizer: gather the shards of the optimizer state on rank 0 (a collective), so its
    state_dict() there is an ordinary AdamW state dict, loadable at any world size."""
    if hasattr(optimizer, "consolidate_state_dict"):
        optimizer.consolidate_state_dict(to=0)


# -- the final model directory ---------------------------------------------------------------------

def full_model_copy(model: torch.nn.Module, cfg: Any, rank: int) -> torch.nn.Module | None:
    """An unsharded CPU copy of an FSDP2 model on rank 0 (None elsewhere): the weights are gathered
    (a collective) into a freshly built model of the same recipe (base model + adapters if LoRA)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from tinylm.training.objectives import rebuilt_with_state

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    return rebuilt_with_state(full, model, cfg)


def save_model_dir(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, cfg: Any, rank: int,
                   name: str = "final", info: dict[str, Any] | None = None) -> Path | None:
    """`save_final` on rank 0 (every rank must call it: an FSDP2 model is gathered first)."""
    from tinylm.training.checkpoint import save_final

    if is_fsdp(model):
        model = full_model_copy(model, cfg, rank)
    elif cfg.parallel == "deepspeed":
        from tinylm.training.deepspeed_zero import full_model_copy as ds_full_model_copy
        from tinylm.training.deepspeed_zero import is_zero3
        if is_zero3(model):
            model = ds_full_model_copy(model, cfg, rank)
    if rank != 0 or model is None:
        return None
    return save_final(model, tokenizer, out_dir, name, info)
