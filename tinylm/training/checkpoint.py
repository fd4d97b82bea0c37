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
                        (LoRA runs: adapter_config.json + adapter_model.safetensors instead)
    manifest.json       size and sha256 of every other file, written last

Atomicity: everything is written into a hidden temporary directory next to the target, flushed
to disk (fsync) and then renamed with `os.replace`, so a crash or `kill -9` mid-save leaves the
previous checkpoints intact and never a half-written `step_*` directory; a later run removes the
orphaned `.tmp_*` directory. Only the newest `keep_last` checkpoints are kept.

Integrity: the manifest catches what atomicity cannot, a file damaged after it was written (bit
rot, a truncated copy, a deleted file). Resuming verifies it and falls back to the newest
checkpoint that still matches (`latest_valid_checkpoint`).

Write errors: a full disk is reported as one `CheckpointWriteError` line naming the checkpoint and
the last complete one. torch.save alone would say only "unexpected pos ..." (its C++ writer drops
the errno), so tensors are written through a Python file object (`torch_save`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^step_(\d{7,})$")
MANIFEST = "manifest.json"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CorruptCheckpointError(ValueError):
    """A checkpoint's files no longer match its manifest (or none is left that does)."""


class CheckpointWriteError(OSError):
    """A checkpoint or model directory could not be written; the message says what is still safe."""


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(Path(path).name.split("_")[1])


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints in out_dir (renamed into place by save_checkpoint), oldest first.

    A directory counts when it has its manifest or (older tinylm) its trainer_state.pt, so a damaged
    checkpoint is still listed: `latest_valid_checkpoint` must see it to report it, not skip it silently.
    """
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CKPT_RE.match(p.name)) and ((p / MANIFEST).exists() or (p / "trainer_state.pt").exists())]
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
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last` up to it.

    `model_files(dir)` adds files before the checkpoint is committed (model config, tokenizer, adapter).
    A failed write (full disk, I/O error) raises CheckpointWriteError after removing the unfinished
    directory: a leftover would waste the space that is short, and older checkpoints stay as they were.
    """
    final = checkpoint_dir(out_dir, step)
    tmp: Path | None = None
    try:
        with reporting_write_errors(f"checkpoint {final.name} to {final.parent}", out_dir):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp_{final.name}_"))
            save_file(model_state_fp32(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            if config_yaml:
                (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            if model_files is not None:
                model_files(tmp)
            torch_save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
            write_manifest(tmp, step)  # last: lists every file above
            replace_dir(tmp, final)
            _fsync_dir(final.parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    prune_checkpoints(out_dir, step, keep_last)
    return final


def prune_checkpoints(out_dir: str | os.PathLike, newest: int, keep_last: int) -> None:
    """Keep the `keep_last` newest checkpoints up to step `newest`.

    Later ones (left when a run resumed from an older checkpoint, e.g. past a corrupt one) are not
    counted: they must not push out the checkpoint just written, and are replaced when the run gets there.
    """
    upto = [p for p in list_checkpoints(out_dir) if checkpoint_step(p) <= newest]
    for old in upto[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_unfinished_saves(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary directories of saves that a crash or `kill -9` interrupted; returns them.

    Resume never reads them (they are not `step_*`), but each may hold gigabytes. Only tinylm's own
    patterns are touched: `checkpoints/.tmp_step_*` and `.tmp_final_*` / `.tmp_best_*` in out_dir.
    """
    out = Path(out_dir)
    found = [*out.glob("checkpoints/.tmp_step_*"), *out.glob(".tmp_final_*"), *out.glob(".tmp_best_*")]
    removed = [p for p in found if p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file object, so that a full disk raises OSError(ENOSPC).

    Given a path, torch's C++ writer reports a failed write as "unexpected pos N vs M" with no errno;
    given a file object, the OSError of its write() survives as that RuntimeError's context.
    """
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


# -- write errors ----------------------------------------------------------------------------------

def io_problem(e: BaseException) -> str | None:
    """"no space left on device", another I/O error's text, or None when `e` is no I/O failure.

    safetensors reports OS errors as SafetensorError("... I/O error: No space left on device (os error 28)").
    """
    text = str(e)
    if (isinstance(e, OSError) and e.errno in NO_SPACE) or "No space left on device" in text \
            or "Disk quota exceeded" in text:
        return "no space left on device"
    if isinstance(e, OSError) or (isinstance(e, SafetensorError) and "I/O error" in text):
        return text
    return None


@contextlib.contextmanager
def reporting_write_errors(what: str, out_dir: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O failure inside the block into one CheckpointWriteError line: what could not be
    written, which checkpoint is still complete, what to do. Other errors are bugs: they pass unchanged."""
    try:
        yield
    except Exception as e:
        problem = io_problem(e)
        if problem is None:
            raise
        raise write_error(problem, what, out_dir) from e


def write_error(problem: str, what: str, out_dir: str | os.PathLike) -> CheckpointWriteError:
    """One line for the user: what failed, which checkpoint is still complete, what to do next."""
    last = latest_checkpoint(out_dir)
    kept = f"the last complete checkpoint is {last}" if last else "no checkpoint was completed before"
    if problem == "no space left on device":
        return CheckpointWriteError(f"no space left on device while saving {what}; {kept}; "
                                    "free space and rerun with resume=true")
    return CheckpointWriteError(f"could not save {what} ({problem}); {kept}; fix that and rerun with resume=true")


# -- integrity: manifest.json ----------------------------------------------------------------------

def _sha256(path: Path, sync: bool = False) -> str:
    """sha256 of a file; `sync` also flushes it to disk, so the rename never commits unwritten data."""
    h = hashlib.sha256()
    with open(path, "r+b" if sync else "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make new directory entries (and renames) durable; POSIX only (Windows cannot open directories)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path, step: int) -> None:
    """Record the size and sha256 of every file in `ckpt` in manifest.json (each file fsynced first)."""
    files = {f.relative_to(ckpt).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f, sync=True)}
             for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != MANIFEST}
    with open(ckpt / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"format": "tinylm-checkpoint", "version": 1, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(ckpt)


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """Check every file against manifest.json; raise CorruptCheckpointError naming the first bad one.

    Returns False, without checking, for a checkpoint saved before manifests existed (no manifest.json
    but a trainer_state.pt): refusing those would strand every older run.
    """
    path = Path(path)
    if not (path / MANIFEST).exists():
        if (path / "trainer_state.pt").exists():
            return False
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} and no trainer_state.pt")
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = [(str(name), int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} is unreadable ({e})") from e
    for name, size, digest in entries:
        problem = _file_problem(path, name, size, digest)
        if problem is not None:
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {problem}")
    return True


def _file_problem(root: Path, name: str, size: int, digest: str) -> str | None:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        return f"{MANIFEST} names a file outside the checkpoint ({name!r})"
    f = root / rel
    if not f.is_file():
        return f"{name} is missing"
    actual = f.stat().st_size
    if actual != size:
        how = "truncated" if actual < size else "overwritten"
        return f"{name} has {actual} bytes, {MANIFEST} says {size} ({how})"
    if _sha256(f) != digest:
        return f"{name} does not match its sha256 in {MANIFEST} (bit flip or modified file)"
    return None


def latest_valid_checkpoint(out_dir: str | os.PathLike, warn: Callable[[str], Any] = print) -> Path | None:
    """Newest checkpoint whose files match their manifest; None when out_dir has no checkpoint at all.

    Each newer damaged checkpoint costs one warning line naming its bad file and the one used instead.
    When every checkpoint is damaged, CorruptCheckpointError lists them: resuming from nothing would
    silently restart the run from scratch.
    """
    bad: list[CorruptCheckpointError] = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            verified = verify_checkpoint(path)
        except CorruptCheckpointError as e:
            bad.append(e)
            continue
        for e in bad:
            warn(f"warning: {e}; falling back to {path.name}")
        if not verified:
            warn(f"note: {path} has no {MANIFEST} (saved before checksums); resuming from it unverified")
        return path
    if bad:
        raise CorruptCheckpointError(f"no valid checkpoint in {Path(out_dir) / 'checkpoints'}: "
                                     + "; ".join(str(e) for e in bad)
                                     + "; restore a backup, or start a fresh run in another out_dir")
    return None


# -- which checkpoint to resume; final and best model directories ----------------------------------

def resume_checkpoint(resume: bool | str, out_dir: str | os.PathLike,
                      say: Callable[[str], Any] = print) -> Path | None:
    """The checkpoint a run resumes from (`resume`: true, false or a path), or None to start fresh.

    resume=true takes the newest checkpoint whose files still match their checksums, with one warning
    per newer damaged one; a checkpoint named by path must match (CorruptCheckpointError otherwise).
    A fresh run refuses to mix with an old run's checkpoints.
    """
    if isinstance(resume, str) and resume not in ("", "false", "true"):
        path = Path(resume)
        if not ((path / "trainer_state.pt").exists() or (path / MANIFEST).exists()):
            raise FileNotFoundError(f"resume={resume}: not a checkpoint directory (no trainer_state.pt)")
        if not verify_checkpoint(path):
            say(f"note: {path} has no {MANIFEST} (saved before checksums); resuming from it unverified")
        return path
    if resume is True or resume == "true":
        return latest_valid_checkpoint(out_dir, warn=say)
    latest = latest_checkpoint(out_dir)
    if latest is not None:
        raise ValueError(f"out_dir {out_dir} already has checkpoints (latest {latest.name}); "
                         "pass resume=true to continue, or choose another out_dir")
    return None


def save_final(model: torch.nn.Module, tokenizer: Any, out_dir: str | os.PathLike, name: str = "final",
               info: dict[str, Any] | None = None) -> Path:
    """HF-format model directory with tokenizer + generation config, written atomically to out_dir/NAME
    (`final`, or `best`: the weights of the lowest validation loss). `info` goes to training_info.json."""
    from tinylm.text.tokenizer import save_pretrained_portable

    final = Path(out_dir) / name
    tmp: Path | None = None
    try:
        with reporting_write_errors(str(final), out_dir):  # a full disk: one line, the checkpoints are safe
            tmp = Path(tempfile.mkdtemp(dir=Path(out_dir), prefix=f".tmp_{name}_"))
            gen = getattr(model, "generation_config", None)
            if gen is not None and gen.eos_token_id is None and tokenizer is not None:
                gen.eos_token_id = tokenizer.eos_token_id
            if getattr(model, "lora_settings", None) is not None:  # LoRA: only the adapter (PEFT format)
                from tinylm.models.lora import save_adapter
                save_adapter(model, tmp, model.lora_settings.get("base_model", ""))
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                save_pretrained_portable(tokenizer, tmp)
            if info:
                (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            replace_dir(tmp, final)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_model_files(model: torch.nn.Module, tokenizer: Any, ckpt: Path) -> None:
    """Make a checkpoint a model directory too (config, generation config, tokenizer) or, for LoRA, hold
    the adapter in PEFT's format. Called before the checkpoint is committed, so the manifest covers them."""
    from tinylm.text.tokenizer import save_pretrained_portable

    if getattr(model, "lora_settings", None) is not None:
        from tinylm.models.lora import save_adapter
        save_adapter(model, ckpt, model.lora_settings.get("base_model", ""))
    elif hasattr(model, "config"):
        model.config.save_pretrained(str(ckpt))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(ckpt))
        if tokenizer is not None:
            save_pretrained_portable(tokenizer, ckpt)


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


def commit_sharded_checkpoint(tmp: Path, final: Path, out_dir: str | os.PathLike, step: int, config_yaml: str,
                              trainer_state: dict, keep_last: int) -> None:
    """Rank 0's half of a sharded save (parallel.py, deepspeed_zero.py), after every rank wrote its
    shards into `tmp`: trainer state + manifest, then one atomic rename to `final`, then pruning."""
    try:
        with reporting_write_errors(f"checkpoint {final.name} to {final.parent}", out_dir):
            if config_yaml:
                (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            torch_save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
            write_manifest(tmp, step)
            replace_dir(tmp, final)
            _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune_checkpoints(out_dir, step, keep_last)
