"""Checkpoints that survive crashes and resume bit-for-bit.

Layout of one checkpoint (`out_dir/checkpoints/step_0000500/`):

    model.safetensors   fp32 weights of the (unwrapped) model
    optimizer.pt        AdamW state_dict (tensors + plain types; loads with weights_only=True)
    trainer_state.pt    step, tokens_seen, elapsed time, schedule, data-iterator position,
                        RNG states (torch CPU/CUDA as uint8 tensors, numpy and python as plain
                        lists), GradScaler state
    config.yaml         the resolved training config
    config.json, generation_config.json, tokenizer files
                        (full-weight runs) so the checkpoint is also a model directory:
                        `tinylm chat / eval / export runs/x/checkpoints/step_0000500` work on it

Atomicity: everything is written into a hidden temporary directory next to the target and
then renamed with `os.replace`, so a crash mid-save leaves the previous checkpoints intact and
never a half-written `step_*` directory. Only the newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^step_(\d{7,})$")


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CKPT_RE.match(p.name)) and (p / "trainer_state.pt").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


# -- RNG states as weights_only-loadable values ----------------------------------------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),                                # uint8 tensor
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]),
                  float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save / load -----------------------------------------------------------------------------------

def model_state_fp32(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full-precision copy of the weights; tied tensors are stored once (safetensors forbids aliasing)."""
    out, seen = {}, {}
    adapters_only = getattr(model, "lora_settings", None) is not None  # LoRA: the frozen base is cfg.model
    for k, v in model.state_dict().items():
        if adapters_only and ".lora_" not in k:
            continue
        key = (v.data_ptr(), v.shape, v.dtype) if v.device.type != "meta" else None
        if key is not None and key in seen:
            continue  # e.g. lm_head.weight tied to embed_tokens.weight
        if key is not None:
            seen[key] = k
        t = v.detach()
        out[k] = (t.float() if t.is_floating_point() else t).cpu().contiguous().clone()
    return out


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final` with renames only, so a crash at any point
    leaves either the old or the new complete directory (re-saving a step, or `final/` again)."""
    if final.exists():
        old = final.with_name(f".old_{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    config_yaml: str = "", keep_last: int = 2,
                    model_files: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.
    `model_files(dir)` adds files into the checkpoint before it is committed (model config, tokenizer)."""
    final = checkpoint_dir(out_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp_{final.name}_"))
    try:
        save_file(model_state_fp32(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if config_yaml:
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        if model_files is not None:
            model_files(tmp)
        state = dict(trainer_state)
        state["rng"] = rng_state()
        torch.save(state, tmp / "trainer_state.pt")  # written last: marks the checkpoint complete
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load weights (+ optimizer, RNG) from a checkpoint directory; returns its trainer_state."""
    path = Path(path)
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{path}: not a complete tinylm checkpoint (no trainer_state.pt)")
    weights = load_file(str(path / "model.safetensors"))
    own = model.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            if k in weights:
                v.copy_(weights[k].to(v.dtype))
            elif not _is_tied(model, k) and not (getattr(model, "lora_settings", None) is not None
                                                 and ".lora_" not in k):
                raise ValueError(f"{path}: checkpoint has no tensor {k!r} (different model?)")
    unexpected = set(weights) - set(own)
    if unexpected:
        raise ValueError(f"{path}: checkpoint tensors not in the model: {sorted(unexpected)[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    """True when `key` aliases another tensor of the state dict (stored once by model_state_fp32)."""
    sd = model.state_dict()
    ptr = sd[key].data_ptr()
    return any(k != key and v.data_ptr() == ptr for k, v in sd.items())
