"""Tests for tinylm.evaluation.report: diagnosis of synthetic learning curves, plots, report.md, CLI."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest

from tinylm.evaluation import report as R

VOCAB = 6400  # ln(6400) = 8.76


def curve(kind: str) -> tuple[list[dict], list[dict]]:
    """Synthetic metrics rows (train, val) for one kind of learning curve."""
    rng = random.Random(0)
    train, val = [], []
    for s in range(0, 1001, 10):
        loss = 2.0 + 6.0 * math.exp(-s / 100) + rng.gauss(0, 0.02)
        if kind == "underfit":
            loss = 8.7 - 0.2 * s / 1000 + rng.gauss(0, 0.02)
        if kind == "overfit":
            loss -= 0.4 * s / 1000
        if kind == "nan" and s >= 600:
            loss = float("nan")
        if kind == "spikes" and s in (300, 500, 700, 800):
            loss *= 2.2
        train.append({"step": s, "loss": loss, "lr": 1e-3, "tokens_per_s": 5000 + rng.gauss(0, 50),
                      "grad_norm": 1.0 + abs(rng.gauss(0, 0.1)), "tokens_seen": s * 2048, "elapsed_s": s * 0.4,
                      "peak_mem_mb": 900.0})
        if s % 100 == 0 and s > 0 and kind != "nan":
            v = 2.1 + 6.0 * math.exp(-s / 100)
            if kind == "overfit":
                v += 0.5 * max(0, s - 400) / 600
            if kind == "underfit":
                v = loss + 0.01
            val.append({"step": s, "val_loss": v})
    return train, val


def make_run(tmp_path, kind: str, ckpts=(400, 600, 1000), moe: bool = False):
    d = tmp_path / kind
    d.mkdir()
    train, val = curve(kind)
    rows = train + val
    if moe:
        for r in train:
            skew = 0.1 * math.exp(-r["step"] / 200)
            r["expert_load"] = [[0.25 + skew, 0.25 - skew, 0.25, 0.25], [0.25, 0.25, 0.25 + skew, 0.25 - skew]]
    rows.sort(key=lambda r: r["step"])
    lines = [json.dumps(r) for r in rows] + ['{"step": 10, "loss": 1.']  # partial last line is skipped
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "config.yaml").write_text(
        "stage: pretrain\nmodel: tiny\ndata:\n  train: data/pretrain.jsonl\n  val: data/val.jsonl\n"
        f"seq_len: 256\nbatch_size: 8\nlr: 0.001\nvocab_size: {VOCAB}\n", encoding="utf-8")
    for s in ckpts:
        (d / "checkpoints" / f"step_{s:07d}").mkdir(parents=True)
    return d


def kinds(findings) -> set[str]:
    return {f.kind for f in findings}


def test_diagnosis_good(tmp_path):
    run = R.load_run(make_run(tmp_path, "good"))
    f = R.diagnose(run, VOCAB)
    assert kinds(f) == {"good"}, f
    assert "Well fit" in f[0].message and "validation loss" in f[0].message
    assert run.skipped_lines == 1


def test_diagnosis_underfit(tmp_path):
    f = R.diagnose(R.load_run(make_run(tmp_path, "underfit")), VOCAB)
    assert "underfit" in kinds(f) and "good" not in kinds(f)
    msg = next(x.message for x in f if x.kind == "underfit")
    assert "ln(vocab=6400) = 8.76" in msg and "steps 0-1000" in msg


def test_diagnosis_overfit_points_to_best_checkpoint(tmp_path):
    run_dir = make_run(tmp_path, "overfit")
    f = R.diagnose(R.load_run(run_dir), VOCAB)
    assert "overfit" in kinds(f), f
    msg = next(x.message for x in f if x.kind == "overfit")
    assert "lowest" in msg and "at step 400" in msg and "step 1000" in msg
    assert str(run_dir / "checkpoints" / "step_0000400") in msg


def test_diagnosis_nan_divergence(tmp_path):
    f = R.diagnose(R.load_run(make_run(tmp_path, "nan", ckpts=(500,))), VOCAB)
    assert "divergence" in kinds(f)
    msg = next(x.message for x in f if x.kind == "divergence")
    assert "became nan at step 600" in msg and "step 590" in msg and "step_0000500" in msg


def test_diagnosis_spikes(tmp_path):
    f = R.diagnose(R.load_run(make_run(tmp_path, "spikes")), VOCAB)
    assert "spikes" in kinds(f) and "good" not in kinds(f)
    msg = next(x.message for x in f if x.kind == "spikes")
    assert "4 loss spike(s)" in msg and "lr 1.00e-03" in msg


def test_rising_loss_is_divergence_without_nan(tmp_path):
    run = R.Run(tmp_path, "rise", train=[{"step": s, "loss": 3.0 + (0 if s < 500 else (s - 500) / 100)}
                                          for s in range(0, 1000, 10)])
    assert "divergence" in kinds(R.diagnose(run, VOCAB))


def test_write_report_plots_and_markdown(tmp_path):
    run_dir = make_run(tmp_path, "overfit", moe=True)
    path = R.write_report(run_dir)
    assert path == run_dir / "report.md"
    for name in ("loss", "val_loss", "lr", "throughput", "grad_norm", "expert_load"):
        png = run_dir / "plots" / f"{name}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in path.read_text()
    md = path.read_text()
    for needle in ("## Diagnosis", "Overfitting", "best val loss", "data/pretrain.jsonl", "tokens/s", "```yaml"):
        assert needle in md, needle


def test_cli_compare_runs(tmp_path, capsys):
    a, b = make_run(tmp_path, "good"), make_run(tmp_path, "spikes")
    parser = argparse.ArgumentParser()
    R.add_cli(parser.add_subparsers())
    args = parser.parse_args(["report", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "good:" in out and "spikes:" in out and "Learning rate likely too high" in out
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| metric | good | spikes |" in md and (tmp_path / "cmp" / "loss.png").stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        R.load_run(tmp_path / "missing")
