"""Scale-out (tinylm/training/parallel.py): ddp, zero1 and FSDP2 (ZeRO-2 / ZeRO-3) on 2 gloo ranks reproduce a
1-process run of the same global batch; sharded checkpoints resume at another world size; final/
loads in transformers; two simulated nodes survive a killed rank by resuming.

One torchrun launch trains every 2-rank configuration in turn (process start-up dominates on CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import REPO, _free_port, losses, make_cfg
from test_train import workdir as train_workdir

from tinylm.train import train
from tinylm.training.checkpoint import list_checkpoints
from tinylm.training.metrics import read_metrics
from tinylm.training.trainconfig import TrainConfig, save_config

workdir = train_workdir  # the fixture: a tiny model dir + pretraining text
STEPS = 20
WORKER = """
import json, os, sys
from pathlib import Path
if os.environ.get("PID_DIR"):  # the multi-node test kills one worker by its pid
    Path(os.environ["PID_DIR"], os.environ["RANK"]).write_text(str(os.getpid()))
from tinylm.train import train
from tinylm.training.trainconfig import load_config
for path in json.loads(sys.argv[1]):
    train(load_config(path), log=print)
import torch.distributed as dist
dist.destroy_process_group()
"""


def run_torchrun(workdir: Path, cfgs: list[TrainConfig], extra: list[str] | None = None,
                 timeout: float = 600, wait: bool = True, env: dict | None = None) -> Any:
    """Train `cfgs` one after the other in one 2-rank torchrun launch (or as given by `extra`);
    wait=False returns the Popen."""
    paths = []
    for c in cfgs:
        paths.append(str(workdir / f"{Path(c.out_dir).name}.yaml"))
        save_config(c, paths[-1])
    script = workdir / "parallel_worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    launch = extra or ["--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(script), json.dumps(paths)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def grad_norms(out_dir: str | Path) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r]


def two_rank(workdir: Path, out: str, **kw) -> TrainConfig:
    """Half the per-rank batch of the 1-process reference: the same global batch on 2 ranks."""
    return make_cfg(workdir, out, max_steps=STEPS, batch_size=2, grad_accum=2, **kw)


@pytest.fixture(scope="module")
def runs(workdir):
    """The 1-process reference (parallel=fsdp at world 1: a sharded checkpoint at step 10), then the
    2-rank runs: ddp, zero1, fsdp ZeRO-3 / ZeRO-2, and a 2-rank resume of the reference's step 10."""
    single = make_cfg(workdir, "p_single", max_steps=STEPS, batch_size=4, grad_accum=2, parallel="fsdp",
                      save_every=10)
    train(single, log=lambda *a: None)
    cfgs = {
        "ddp": two_rank(workdir, "p_ddp"),
        "zero1": two_rank(workdir, "p_zero1", parallel="zero1", save_every=10),
        "zero3": two_rank(workdir, "p_zero3", parallel="fsdp", save_every=10),
        "zero2": two_rank(workdir, "p_zero2", parallel="fsdp"),
        "resume_1to2": two_rank(workdir, "p_resume_1to2", parallel="fsdp",
                                resume=str(Path(single.out_dir) / "checkpoints" / "step_0000010")),
    }
    cfgs["zero2"].fsdp.reshard_after_forward = False
    run_torchrun(workdir, list(cfgs.values()))
    return single, cfgs


def test_ddp_zero1_fsdp_match_one_process(runs):
    single, cfgs = runs
    ref = losses(single.out_dir)
    assert len(ref) == STEPS and ref[-1] < ref[0] - 1.0  # it learns
    for name in ("ddp", "zero1", "zero3", "zero2"):
        got = losses(cfgs[name].out_dir)
        assert got == pytest.approx(ref, rel=1e-4), name
        # AdamW + clipping hide a wrong gradient scale from the losses; the norm does not.
        assert grad_norms(cfgs[name].out_dir) == pytest.approx(grad_norms(single.out_dir), rel=1e-4), name


def test_memory_per_rank_is_sharded(runs):
    _, cfgs = runs

    def mem(name: str) -> list[dict]:
        rows = read_metrics(Path(cfgs[name].out_dir) / "metrics.jsonl")
        return next(r["memory_per_rank"] for r in rows if "memory_per_rank" in r)

    ddp, zero1, zero3 = mem("ddp"), mem("zero1"), mem("zero3")
    assert len(ddp) == 2 and ddp[0]["param_bytes"] == ddp[1]["param_bytes"] > 0
    assert ddp[0]["optim_bytes"] == 2 * ddp[0]["param_bytes"]  # AdamW: exp_avg + exp_avg_sq
    assert zero1[0]["param_bytes"] == ddp[0]["param_bytes"]
    assert sum(m["optim_bytes"] for m in zero1) == ddp[0]["optim_bytes"]  # the moments split, not copied
    for m in zero3:
        total = m["param_bytes"] + m["grad_bytes"] + m["optim_bytes"]
        assert total <= 0.55 * (ddp[0]["param_bytes"] + ddp[0]["grad_bytes"] + ddp[0]["optim_bytes"])
    assert all(m["peak_rss_mb"] > 0 for m in ddp + zero3)


def test_sharded_checkpoint_resumes_on_one_process(runs, workdir):
    """2 ranks -> 1: the DCP shards are re-sliced, the data position kept; steps 11-20 are repeated."""
    _, cfgs = runs
    ckpt = Path(cfgs["zero3"].out_dir) / "checkpoints" / "step_0000010"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "manifest.json").is_file()
    for name, parallel in (("zero3", "fsdp"), ("zero1", "zero1")):
        resumed = make_cfg(workdir, f"p_resume_2to1_{name}", max_steps=STEPS, batch_size=4, grad_accum=2,
                           parallel=parallel, resume=str(Path(cfgs[name].out_dir) / "checkpoints" / "step_0000010"))
        train(resumed, log=lambda *a: None)
        assert losses(resumed.out_dir) == pytest.approx(losses(cfgs[name].out_dir)[10:], rel=1e-3), name


def test_one_process_checkpoint_resumes_on_two_ranks(runs):
    """1 -> 2: the reference's step-10 checkpoint, continued by 2 FSDP2 ranks, repeats its steps 11-20."""
    single, cfgs = runs
    assert losses(cfgs["resume_1to2"].out_dir) == pytest.approx(losses(single.out_dir)[10:], rel=1e-3)


def test_final_dir_of_fsdp_run_loads_in_transformers(runs):
    """final/ is gathered from the shards into an ordinary safetensors model directory."""
    from transformers import AutoModelForCausalLM

    single, cfgs = runs
    a = AutoModelForCausalLM.from_pretrained(Path(cfgs["zero3"].out_dir) / "final")
    b = AutoModelForCausalLM.from_pretrained(Path(single.out_dir) / "final")
    assert type(a).__name__ == "TinyLMForCausalLM" and (Path(cfgs["zero3"].out_dir) / "final" / "model.safetensors").is_file()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_lora_moe_and_fsdp_options(workdir):
    """Under FSDP2 on 2 ranks: LoRA (frozen base + sharded adapters), MoE (expert-bias balancing) and
    SFT repeat their 1-process runs; bf16 mixed precision + activation checkpointing + CPU offload train
    close to fp32."""
    short = {"max_steps": 6, "grad_accum": 2}
    full1 = make_cfg(workdir, "o_full1", batch_size=4, **short)
    lora1 = make_cfg(workdir, "o_lora1", batch_size=4, **short)
    moe1 = make_cfg(workdir, "o_moe1", batch_size=4, model="tiny-moe", **short)
    sft1 = make_cfg(workdir, "o_sft1", batch_size=4, stage="sft", data_train=str(workdir / "chat.jsonl"), **short)
    lora1.lora.enabled = True
    for c in (full1, lora1, moe1, sft1):
        train(c, log=lambda *a: None)
    lora2 = make_cfg(workdir, "o_lora2", batch_size=2, parallel="fsdp", **short)
    lora2.lora.enabled = True
    moe2 = make_cfg(workdir, "o_moe2", batch_size=2, parallel="fsdp", model="tiny-moe", **short)
    sft2 = make_cfg(workdir, "o_sft2", batch_size=2, stage="sft", parallel="fsdp",
                    data_train=str(workdir / "chat.jsonl"), **short)
    mixed = make_cfg(workdir, "o_mixed", batch_size=2, parallel="fsdp", grad_checkpointing=True, **short)
    mixed.fsdp.mixed_precision = mixed.fsdp.cpu_offload = True
    run_torchrun(workdir, [lora2, moe2, sft2, mixed])
    assert losses(lora2.out_dir) == pytest.approx(losses(lora1.out_dir), rel=1e-4)
    assert (Path(lora2.out_dir) / "final" / "adapter_model.safetensors").is_file()
    assert losses(moe2.out_dir) == pytest.approx(losses(moe1.out_dir), rel=1e-3)
    assert losses(sft2.out_dir) == pytest.approx(losses(sft1.out_dir), rel=1e-4)  # masked labels, packing off
    ref, got = losses(full1.out_dir), losses(mixed.out_dir)
    assert got != pytest.approx(ref, rel=1e-6)  # bf16 weights really were used ...
    assert got == pytest.approx(ref, rel=2e-2)  # ... and train like fp32


def node_launch(workdir: Path, cfg: TrainConfig, port: int, node_rank: int, pid_dir: Path) -> subprocess.Popen:
    """One simulated node: torchrun with 1 worker joining a 2-node c10d rendezvous on 127.0.0.1."""
    rdzv = ["--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tinylm-test", "--max-restarts", "0"]
    return run_torchrun(workdir, [cfg], extra=rdzv, wait=False, env={"PID_DIR": str(pid_dir)})


@pytest.mark.slow
def test_two_nodes_a_killed_rank_stops_the_run_and_it_resumes(workdir, tmp_path):
    """Two torchrun launches (one per simulated node). kill -9 of node 1's worker mid-run makes both
    launches exit non-zero within a timeout (no hang); relaunching with resume=true finishes the run,
    and its losses are those of one process that was never interrupted."""
    steps = 40
    ref = make_cfg(workdir, "n_ref", max_steps=steps, batch_size=4)
    train(ref, log=lambda *a: None)
    cfg = make_cfg(workdir, "n_two_nodes", max_steps=steps, batch_size=2, parallel="fsdp", save_every=5,
                   keep_last=3, dist_timeout_min=1.0)
    port = _free_port()
    nodes = [node_launch(workdir, cfg, port, r, tmp_path) for r in (0, 1)]
    deadline = time.time() + 240
    while not any(p.name >= "step_0000010" for p in list_checkpoints(cfg.out_dir)):
        assert time.time() < deadline and all(n.poll() is None for n in nodes), "run did not reach step 10"
        time.sleep(0.2)
    os.kill(int((tmp_path / "1").read_text()), signal.SIGKILL)
    t_kill = time.time()
    codes = [n.wait(timeout=120) for n in nodes]  # a hang would raise TimeoutExpired here
    assert all(c != 0 for c in codes) and time.time() - t_kill < 120
    assert not any(p.name == f"step_{steps:07d}" for p in list_checkpoints(cfg.out_dir))

    cfg.resume = True
    port = _free_port()
    nodes = [node_launch(workdir, cfg, port, r, tmp_path) for r in (0, 1)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "resumed from" in outs[0]
    assert losses(cfg.out_dir) == pytest.approx(losses(ref.out_dir), rel=1e-3)
