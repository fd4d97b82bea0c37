"""`tinylm quickstart` end to end with a handful of steps: every stage runs and writes its outputs."""

from __future__ import annotations

import json

import pytest

from tinylm.cli import main


def test_quickstart_pipeline_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--pretrain-steps", "2", "--sft-steps", "2", "--fast", "--dtype", "fp32"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for stage in ("1/4 pretrain", "2/4 supervised fine-tuning", "3/4 answers to held-out prompts", "4/4 training reports"):
        assert stage in text
    assert "identity answers mentioning the expected name:" in text and "tinylm chat" in text
    for run in ("pretrain", "sft"):
        assert (out / run / "final" / "model.safetensors").is_file()
        assert (out / run / "report.md").is_file() and (out / run / "plots" / "loss.png").stat().st_size > 0
        rows = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert main(args) == 2  # an existing run is never overwritten silently
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--pretrain-steps", "--sft-steps"])
def test_quickstart_rejects_bad_step_counts(tmp_path, flag, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "x"), flag, "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
