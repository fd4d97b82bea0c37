"""Rollout stages under sharded weights (tinylm/inference/sampler.py, tinylm/training/parallel.py): with FSDP2
or DeepSpeed ZeRO-3 each forward is a collective, so ranks whose rollouts end early keep stepping until
every rank is done. Without that sync the lockstep test below deadlocks (and fails at its 60 s timeout).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_parallel import run_torchrun
from test_train import REPO, _free_port, make_cfg
from test_train import workdir as train_workdir

from tinylm.training.metrics import read_metrics
from tinylm.training.trainconfig import TrainConfig

workdir = train_workdir  # the fixture: a tiny tinylm model dir with the bundled tokenizer
LOCKSTEP = """
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from tinylm.inference.sampler import sample
from tinylm.models.loading import load_model

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
model = load_model(sys.argv[1], dtype="fp32", device="cpu")[0]
v = model.config.vocab_size
# rank 0: every token is an eos (its rollouts end after 1 token); rank 1: none is (they run 12 tokens)
eos = tuple(range(v)) if rank == 0 else (v + 1,)
prompts = [[5, 6, 7], [8, 9]] if rank == 0 else [[10, 11, 12, 13], [14]]
plain = sample(model, prompts, 12, temperature=0.0, eos_ids=eos)   # unsharded: no collective
mesh = init_device_mesh("cpu", (2,))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
sharded = sample(model, prompts, 12, temperature=0.0, eos_ids=eos)
json.dump({"plain": plain, "sharded": sharded}, open(sys.argv[2] + f".{rank}", "w"))
dist.destroy_process_group()
"""


def test_sharded_rollouts_of_different_lengths_stay_in_lockstep(workdir, tmp_path):
    """Rank 0's rollouts end after 1 token, rank 1's run 12: both finish, and the FSDP2 samples equal the
    unsharded model's greedy samples token for token (the padding steps change nothing)."""
    script = tmp_path / "lockstep.py"
    script.write_text(textwrap.dedent(LOCKSTEP))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), str(workdir / "model"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1))
    assert [len(c) for c in r0["sharded"]] == [1, 1]
    assert [len(c) for c in r1["sharded"]] == [12, 12]
    assert r0["sharded"] == r0["plain"] and r1["sharded"] == r1["plain"]


def _prompt_file(path: Path) -> str:
    words = ["a", "b c", "d e f g h", "i", "j k l m n o p", "q r", "s", "t u v w"]
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    return str(path)


def _eos_model(workdir: Path) -> str:
    """The tiny model with every 4th token id an eos: its rollouts end at random lengths (1..8 tokens), so
    the two ranks finish sampling at different steps."""
    d = workdir / "model_eos"
    if not d.exists():
        shutil.copytree(workdir / "model", d)
        gen = json.loads((d / "generation_config.json").read_text())
        vocab = json.loads((d / "config.json").read_text())["vocab_size"]
        gen["eos_token_id"] = list(range(0, vocab, 4))
        (d / "generation_config.json").write_text(json.dumps(gen))
    return str(d)


def _grpo_cfg(workdir: Path, out: str, **kw) -> TrainConfig:
    cfg = make_cfg(workdir, out, stage="grpo", max_steps=3, warmup_steps=0, dtype="fp32", device="cpu",
                   batch_size=4, model=_eos_model(workdir), data_train=_prompt_file(workdir / "rl_prompts.jsonl"),
                   dist_timeout_min=1.0, **kw)
    cfg.grpo.group_size, cfg.grpo.max_new_tokens, cfg.grpo.beta = 2, 8, 0.05
    cfg.grpo.reward = "test_parallel_rl:length_reward"
    return cfg


def length_reward(prompts: list, completions: list[str], **kw) -> list[float]:
    """Scripted reward: completion characters / 20 (it varies within a group, so the advantages do too)."""
    return [len(c) / 20 for c in completions]


def test_grpo_under_fsdp_and_deepspeed_zero3_matches_ddp(workdir):
    """2 gloo ranks, rollouts of random lengths: GRPO under FSDP2 (ZeRO-3) and DeepSpeed ZeRO-3 trains 3 steps
    without a hang (60 s collective timeout), and its losses equal a 2-rank DDP run's (the unsynced sampler)
    within 1e-4 relative: the pad steps draw no random numbers, so each rank samples the same tokens in
    both runs and only the gradient reduction order differs (float32 rounding, ~1e-7).
    Why DDP and not 1 process: a single process samples the global batch from one random stream, two
    ranks from two, so their rollouts differ. (Stage ppo runs in one process only: ppo.py.)"""
    cfgs = [_grpo_cfg(workdir, "rl_ddp"), _grpo_cfg(workdir, "rl_fsdp", parallel="fsdp")]
    try:
        import deepspeed  # noqa: F401
        cfgs.append(_grpo_cfg(workdir, "rl_ds3", parallel="deepspeed"))
        cfgs[-1].deepspeed.stage = 3
    except ImportError:
        pass
    run_torchrun(workdir, cfgs, timeout=300, env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    rows = {c.out_dir: [r for r in read_metrics(Path(c.out_dir) / "metrics.jsonl") if "loss" in r] for c in cfgs}
    ref = rows[cfgs[0].out_dir]
    assert len(ref) == 3 and all(math.isfinite(r["loss"]) for r in ref)
    assert any(r["completion_len"] < 8 for r in ref)  # rollouts ended early, at different steps
    assert all(r["loss"] != 0 for r in ref)  # the rewards vary, so the losses are not trivially 0
    for c in cfgs[1:]:
        got = rows[c.out_dir]
        assert [r["completion_len"] for r in got] == [r["completion_len"] for r in ref], c.out_dir
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-4, abs=1e-7), c.out_dir
        assert (Path(c.out_dir) / "final" / "config.json").exists(), c.out_dir


def test_sharded_agentic_rl_is_refused():
    """Tool rollouts run a different number of turns per rank: under sharded weights that would deadlock."""
    from tinylm.training.parallel import shard_model

    cfg = TrainConfig(stage="grpo", parallel="fsdp")
    cfg.grpo.tools = ["calculator"]
    with pytest.raises(ValueError, match=r"parallel=fsdp does not support agentic RL \(grpo.tools set\)"):
        shard_model(torch.nn.Linear(2, 2), cfg, torch.device("cpu"), world=2)
    assert shard_model(lin := torch.nn.Linear(2, 2), cfg, torch.device("cpu"), world=1) is lin
    pytest.importorskip("deepspeed")
    from tinylm.training.deepspeed_zero import wrap

    cfg.parallel, cfg.deepspeed.stage = "deepspeed", 3
    with pytest.raises(ValueError, match=r"deepspeed.stage=3 does not support agentic RL"):
        wrap(lin, torch.optim.SGD(lin.parameters(), lr=0.1), cfg)
