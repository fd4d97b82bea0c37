"""`parallel: deepspeed` (tinylm/training/deepspeed_zero.py): DeepSpeed ZeRO stages 1, 2 and 3 on 2 gloo ranks
reproduce a 1-process run of the same global batch (the loss scaling gives the loop's token-mean
gradient); a DeepSpeed checkpoint resumes; final/ is an ordinary model directory.

One torchrun launch trains every 2-rank configuration in turn (process start-up dominates on CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_parallel import grad_norms, run_torchrun
from test_train import losses, make_cfg
from test_train import workdir as train_workdir

from tinylm.train import train

pytest.importorskip("deepspeed")

workdir = train_workdir  # the fixture: a tiny model dir + pretraining text
STEPS = 10


@pytest.fixture(scope="module")
def runs(workdir):
    """The 1-process reference, then on 2 ranks: ZeRO-1, ZeRO-2 (checkpoint at step 5), ZeRO-3 and a
    ZeRO-2 run resumed from that step-5 checkpoint, one launch."""
    single = make_cfg(workdir, "ds_single", max_steps=STEPS, batch_size=4, grad_accum=2, grad_clip=1.0)
    train(single, log=lambda *a: None)
    cfgs = {}
    for stage in (1, 2, 3):
        cfgs[stage] = make_cfg(workdir, f"ds_zero{stage}", max_steps=STEPS, batch_size=2, grad_accum=2,
                               grad_clip=1.0, parallel="deepspeed", save_every=5 if stage == 2 else 0)
        cfgs[stage].deepspeed.stage = stage
    cfgs["resume"] = make_cfg(workdir, "ds_resume", max_steps=STEPS, batch_size=2, grad_accum=2, grad_clip=1.0,
                              parallel="deepspeed",
                              resume=str(Path(cfgs[2].out_dir) / "checkpoints" / "step_0000005"))
    run_torchrun(workdir, list(cfgs.values()))
    return single, cfgs


def test_deepspeed_zero_stages_match_one_process(runs):
    single, cfgs = runs
    ref = losses(single.out_dir)
    assert len(ref) == STEPS and ref[-1] < ref[0] - 0.5  # it learns
    for stage in (1, 2, 3):
        assert losses(cfgs[stage].out_dir) == pytest.approx(ref, rel=1e-4), stage
        # AdamW hides a wrong gradient scale from the losses; the norm (before clipping) does not.
        assert grad_norms(cfgs[stage].out_dir) == pytest.approx(grad_norms(single.out_dir), rel=5e-4), stage


def test_deepspeed_memory_per_rank_is_partitioned(runs):
    """The logged per-rank bytes: every stage splits the fp32 master copy + AdamW moments (3 x 4 bytes per
    parameter) over the 2 ranks; ZeRO-2 also the gradients; ZeRO-3 also the weights."""
    from tinylm.training.metrics import read_metrics

    _, cfgs = runs

    def mem(stage: int) -> list[dict]:
        rows = read_metrics(Path(cfgs[stage].out_dir) / "metrics.jsonl")
        return next(r["memory_per_rank"] for r in rows if "memory_per_rank" in r)

    full = mem(1)[0]["param_bytes"]  # ZeRO-1: every rank holds all fp32 weights
    for stage in (1, 2, 3):
        m = mem(stage)
        assert len(m) == 2 and sum(r["optim_bytes"] for r in m) == pytest.approx(3 * full, rel=0.01), stage
        assert max(r["optim_bytes"] for r in m) <= 0.55 * 3 * full, stage
    assert all(r["grad_bytes"] == full for r in mem(1))
    assert all(r["grad_bytes"] <= 0.55 * full for r in mem(2) + mem(3))
    assert all(r["param_bytes"] <= 0.55 * full for r in mem(3))


def test_deepspeed_checkpoint_resumes(runs):
    """The ZeRO-2 checkpoint of step 5 (DeepSpeed's own files, completed atomically) resumes on 2 ranks:
    steps 6-10 repeat the uninterrupted run with the data position kept."""
    _, cfgs = runs
    ckpt = Path(cfgs[2].out_dir) / "checkpoints" / "step_0000005"
    assert (ckpt / "deepspeed" / "state").is_dir() and (ckpt / "manifest.json").is_file()
    assert not list(ckpt.parent.glob(".tmp_*"))
    assert losses(cfgs["resume"].out_dir) == pytest.approx(losses(cfgs[2].out_dir)[5:], rel=1e-3)


def test_deepspeed_final_dirs_load_in_transformers(runs):
    """final/ of ZeRO-1 and ZeRO-3 (partitions gathered) loads with AutoModelForCausalLM and equals the
    1-process weights."""
    from transformers import AutoModelForCausalLM

    single, cfgs = runs
    ref = AutoModelForCausalLM.from_pretrained(Path(single.out_dir) / "final").state_dict()
    for stage in (1, 3):
        got = AutoModelForCausalLM.from_pretrained(Path(cfgs[stage].out_dir) / "final").state_dict()
        assert got.keys() == ref.keys()
        for name, p in got.items():
            torch.testing.assert_close(p, ref[name], rtol=1e-3, atol=1e-5, msg=f"zero{stage} {name}")


def test_deepspeed_config_errors():
    """The loop's own settings cannot be overridden through the passthrough; stages are 1-3."""
    from tinylm.training.deepspeed_zero import ds_config
    from tinylm.training.trainconfig import TrainConfig

    cfg = TrainConfig(parallel="deepspeed", batch_size=3, grad_accum=5, grad_clip=0.5, max_steps=1)
    cfg.data.train = "x.jsonl"
    cfg.deepspeed.config = {"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}
    got = ds_config(cfg)
    assert got["zero_optimization"] == {"overlap_comm": True, "stage": 2} and got["wall_clock_breakdown"]
    assert (got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"], got["gradient_clipping"]) == (
        3, 5, 0.5)
    cfg.deepspeed.config = {"gradient_accumulation_steps": 8}
    with pytest.raises(ValueError, match="deepspeed.config.gradient_accumulation_steps is set by tinylm"):
        ds_config(cfg)
    cfg.deepspeed.stage = 4
    with pytest.raises(ValueError, match="deepspeed.stage must be 1, 2 or 3"):
        cfg.validate()
