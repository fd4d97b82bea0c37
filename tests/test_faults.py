"""Training under faults: kill -9 inside a checkpoint save, a full disk, damaged checkpoints.

The kill and full-disk tests run a real `tinylm train` in a child process. The child is the normal
CLI, with torch.save wrapped so that the write of optimizer.pt in one checkpoint stops half-way: it
then either blocks (and the test sends SIGKILL) or raises ENOSPC. The damaged-checkpoint tests flip
a bit, truncate or delete one file of a finished run and resume in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tinylm.train import train
from tinylm.training.checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    torch_save,
    verify_checkpoint,
)
from tinylm.training.metrics import read_metrics
from tinylm.training.trainconfig import TrainConfig, save_config

# A real `tinylm train CONFIG` whose write of optimizer.pt in checkpoint STEP stops half-way through:
# FAULT "pause" blocks there (after touching MARKER) until the test kills it, "enospc" fails the write.
CHILD = textwrap.dedent("""
    import errno, io, os, sys, time
    import torch
    from tinylm.cli import main

    config, fault, step, marker = sys.argv[1:5]
    real_save = torch.save

    def faulty_save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if not (name.endswith("optimizer.pt") and f".tmp_step_{int(step):07d}_" in name):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        if fault == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        open(marker, "w").close()
        time.sleep(600)

    torch.save = faulty_save
    sys.exit(main(["train", config]))
""")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """A micro model (1 layer, width 32, bundled tokenizer) and a small pretraining file."""
    from tinylm.export.interop import init_model

    d = tmp_path_factory.mktemp("faults")
    init_model("tiny", d / "micro", seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    words = "the cat sat on the mat and the dog ran in the park while a bird sang".split()
    with open(d / "train.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLM_CACHE", str(d / "cache"))  # children inherit it: data is prepared once
        yield d


def make_cfg(lab: Path, out: Path, **kw) -> TrainConfig:
    cfg = TrainConfig(model=str(lab / "micro"), seq_len=32, batch_size=2, lr=3e-3, warmup_steps=1, max_steps=6,
                      save_every=2, keep_last=3, log_every=1, eval_every=0, out_dir=str(out), seed=3, device="cpu")
    cfg.data.train = str(lab / "train.jsonl")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def start_child(cfg: TrainConfig, fault: str, step: int, tmp: Path) -> subprocess.Popen:
    save_config(cfg, tmp / "run.yaml")
    (tmp / "child.py").write_text(CHILD)
    return subprocess.Popen([sys.executable, str(tmp / "child.py"), str(tmp / "run.yaml"), fault, str(step),
                             str(tmp / "paused")], stdout=open(tmp / "stdout.txt", "w"),
                            stderr=open(tmp / "stderr.txt", "w"), env={**os.environ, "OMP_NUM_THREADS": "1"})


def fresh_model(lab: Path) -> torch.nn.Module:
    from tinylm.models.loading import load_model

    return load_model(str(lab / "micro"))[0]


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


# -- kill -9 and a full disk during a save ---------------------------------------------------------

def test_kill_9_inside_a_save_keeps_previous_checkpoint_and_resume_finishes(lab, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(lab, out)
    child = start_child(cfg, "pause", 4, tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "paused").exists():
        assert child.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        assert time.time() < deadline, "the child never reached the save of step 4"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    half_written = list((out / "checkpoints").glob(".tmp_step_0000004_*"))
    assert len(half_written) == 1 and (half_written[0] / "optimizer.pt").exists()  # killed mid-write
    assert names(list_checkpoints(out)) == ["step_0000002"]  # the unfinished one is never listed
    assert verify_checkpoint(out / "checkpoints" / "step_0000002") is True
    assert load_checkpoint(out / "checkpoints" / "step_0000002", fresh_model(lab), restore_rng=False)["step"] == 2

    lines: list[str] = []
    cfg.resume = True
    summary = train(cfg, log=lines.append)
    assert f"resumed from {out / 'checkpoints' / 'step_0000002'} at step 2" in lines
    assert any(line.startswith("removed ") and ".tmp_step_0000004_" in line for line in lines), lines
    assert summary["step"] == 6 and not half_written[0].exists()
    assert names(list_checkpoints(out)) == ["step_0000002", "step_0000004", "step_0000006"]
    # Same losses as a run that was never killed (two processes: equal up to float summation order).
    ref = make_cfg(lab, tmp_path / "ref")
    train(ref, log=lambda *a: None)
    assert losses(out) == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)


def test_full_disk_during_a_save_ends_with_one_line_and_keeps_last_checkpoint(lab, tmp_path):
    out = tmp_path / "run"
    child = start_child(make_cfg(lab, out), "enospc", 4, tmp_path)
    assert child.wait(timeout=180) == 2
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    ckpts = out / "checkpoints"
    assert errors == [f"tinylm train: error: no space left on device while saving checkpoint step_0000004 to "
                      f"{ckpts}; the last complete checkpoint is {ckpts / 'step_0000002'}; "
                      "free space and rerun with resume=true"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]  # no half-written temp directory
    assert verify_checkpoint(ckpts / "step_0000002") is True
    assert load_checkpoint(ckpts / "step_0000002", fresh_model(lab), restore_rng=False)["step"] == 2


def test_safetensors_out_of_space_is_reported_and_cleaned_up(lab, tmp_path, monkeypatch):
    """safetensors wraps ENOSPC in its own exception type (text as a real full tmpfs gives it)."""
    from safetensors import SafetensorError

    import tinylm.training.checkpoint as ckpt_mod

    model = fresh_model(lab)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1, "tokens_seen": 0})

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(CheckpointWriteError, match=r"^no space left on device while saving checkpoint "
                                                   r"step_0000002 .* the last complete checkpoint is .*step_0000001"):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2, "tokens_seen": 0})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]


@pytest.mark.skipif(not (os.path.exists("/dev/full") and Path("/dev/full").is_char_device()),
                    reason="needs Linux /dev/full")
def test_torch_save_reports_a_real_enospc():
    """torch.save to a path says only 'unexpected pos'; torch_save keeps the OS error."""
    with pytest.raises(OSError) as e:
        torch_save({"x": torch.zeros(100_000)}, Path("/dev/full"))
    assert e.value.errno == 28


# -- damaged checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(lab, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(make_cfg(lab, out, max_steps=4), log=lambda *a: None)
    assert names(list_checkpoints(out)) == ["step_0000002", "step_0000004"]
    return out


def damage(ckpt: Path, file: str, how: str) -> None:
    path = ckpt / file
    data = bytearray(path.read_bytes())
    if how == "bit flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()


@pytest.mark.parametrize("file,how,reason", [
    ("model.safetensors", "bit flip", "model.safetensors does not match its sha256 in manifest.json"),
    ("optimizer.pt", "truncate", "optimizer.pt has .* bytes, manifest.json says .* \\(truncated\\)"),
    ("trainer_state.pt", "delete", "trainer_state.pt is missing"),
])
def test_resume_skips_a_damaged_checkpoint_with_one_warning(lab, finished, tmp_path, file, how, reason):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    damage(out / "checkpoints" / "step_0000004", file, how)
    lines: list[str] = []
    summary = train(make_cfg(lab, out, resume=True), log=lines.append)
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1, lines
    assert warnings[0].startswith(f"warning: checkpoint {out / 'checkpoints' / 'step_0000004'} is corrupt: ")
    assert re.search(reason, warnings[0]) and warnings[0].endswith("; falling back to step_0000002")
    assert f"resumed from {out / 'checkpoints' / 'step_0000002'} at step 2" in lines
    assert summary["step"] == 6
    assert verify_checkpoint(out / "checkpoints" / "step_0000004")  # re-saved when the run got there again


def test_no_valid_checkpoint_is_one_clear_error(finished, tmp_path, capsys):
    from tinylm.cli import main

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    damage(out / "checkpoints" / "step_0000002", "model.safetensors", "truncate")
    damage(out / "checkpoints" / "step_0000004", "optimizer.pt", "bit flip")
    assert main(["train", str(out / "config.yaml"), f"out_dir={out}", "resume=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"tinylm train: error: no valid checkpoint in {out}")
    assert "step_0000002 is corrupt: model.safetensors has" in err and "step_0000004 is corrupt: optimizer.pt" in err
    # Naming the damaged checkpoint explicitly is refused too, naming the file.
    with pytest.raises(CorruptCheckpointError, match="step_0000004 is corrupt: optimizer.pt does not match"):
        resume_checkpoint(str(out / "checkpoints" / "step_0000004"), out)


def test_checkpoint_without_manifest_still_resumes_unverified(finished, tmp_path):
    """Checkpoints saved before manifests existed stay usable (with a note), not refused as corrupt."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoints" / "step_0000004" / "manifest.json").unlink()
    notes: list[str] = []
    assert latest_valid_checkpoint(out, warn=notes.append) == out / "checkpoints" / "step_0000004"
    assert len(notes) == 1 and "no manifest.json" in notes[0] and "unverified" in notes[0]


def test_manifest_cannot_point_outside_the_checkpoint(finished, tmp_path):
    ckpt = tmp_path / "step_0000004"
    shutil.copytree(finished / "checkpoints" / "step_0000004", ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="names a file outside the checkpoint"):
        verify_checkpoint(ckpt)
