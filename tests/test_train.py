"""Tests of the training engine: config, gradient accumulation, resume, DDP, checkpoints, metrics."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tinylm.train import NonFiniteLossError, train
from tinylm.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from tinylm.training.loop_parts import accumulate_gradients, finish_gradients
from tinylm.training.metrics import read_metrics
from tinylm.training.objectives import LMObjective, SFTObjective
from tinylm.training.trainconfig import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on the mat and the dog ran in the park while a bird sang "
         "一只 小猫 坐在 垫子 上 小狗 在 公园 里 跑 鸟儿 在 唱歌").split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny tinylm model dir (bundled tokenizer) + small pretrain / chat jsonl files."""
    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.text.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("train")
    os.environ["TINYLM_CACHE"] = str(d / "cache")
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = TinyLMConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = TinyLMForCausalLM(cfg)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    g = torch.Generator().manual_seed(0)
    with open(d / "pretrain.jsonl", "w") as f:  # repetitive text: a model can learn it fast
        for i in range(160):
            words = [WORDS[(i + j) % len(WORDS)] for j in range(40 + int(torch.randint(0, 40, (1,), generator=g)))]
            f.write(json.dumps({"text": " ".join(words)}, ensure_ascii=False) + "\n")
    with open(d / "chat.jsonl", "w") as f:  # answers of very different lengths
        for i in range(48):
            answer = " ".join(WORDS[: 2 + (i * 7) % 30])
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return d


def make_cfg(workdir: Path, out: str, **kw) -> TrainConfig:
    cfg = TrainConfig(model=str(workdir / "model"), seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2,
                      max_steps=6, log_every=1, eval_every=0, save_every=0, out_dir=str(workdir / out), seed=7)
    cfg.data.train = str(workdir / "pretrain.jsonl")
    for k, v in kw.items():
        if k.startswith("data_"):
            setattr(cfg.data, k[5:], v)
        else:
            setattr(cfg, k, v)
    return cfg


def losses(out_dir: str | Path) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r]


# -- config ----------------------------------------------------------------------------------------

def test_config_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\nmodel: tiny\ndata:\n  train: a.jsonl\nlr: 1e-3\nmax_steps: 5\n")
    cfg = load_config(recipe, ["lr=3e-4", "data.val=b.jsonl", "max_steps=10", "resume=true",
                               "sample_prompts=[hi, there]", "lora.r=8"])
    assert cfg.stage == "sft" and cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.data.train == "a.jsonl" and cfg.data.val == "b.jsonl" and cfg.max_steps == 10
    assert cfg.resume is True and cfg.sample_prompts == ["hi", "there"] and cfg.lora.r == 8
    assert load_config(recipe, ["resume=runs/x/checkpoints/step_0000010"]).resume == "runs/x/checkpoints/step_0000010"


@pytest.mark.parametrize("override,needle", [
    ("max_step=3", "did you mean: max_steps"),
    ("data.trian=x", "data.train"),
    ("learning_rate=1", "unknown config key 'learning_rate'"),
    ("batch_size=abc", "batch_size='abc' should be an integer"),
    ("stage=pretrian", "stage='pretrian' is not one of"),
    ("dtype=int8", "dtype='int8'"),
    ("lr", "key=value"),
])
def test_config_errors_name_the_key(tmp_path, override, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: a.jsonl\nmax_steps: 5\n")
    with pytest.raises(ValueError) as e:
        load_config(recipe, [override])
    assert needle in str(e.value)


def test_config_error_in_yaml_names_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: a.jsonl\nwarmup: 5\n")
    with pytest.raises(ValueError, match=r"r\.yaml: unknown config key 'warmup'; did you mean: warmup_steps"):
        load_config(recipe)


# -- gradient accumulation -------------------------------------------------------------------------

def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulation_equals_big_batch(workdir):
    """accum 4 x batch 2 == batch 8 (loss and grads), with unequal supervised tokens per micro-batch;
    the reference is transformers' own mean CE over the whole batch."""
    from tinylm.data.dataset import collate, load_token_dataset
    from tinylm.models.loading import load_model

    model, tok = load_model(str(workdir / "model"))
    ds = load_token_dataset(str(workdir / "chat.jsonl"), tokenizer=tok, kind="sft", seq_len=64)
    rows = [0, 9, 3, 17, 5, 28, 1, 13]
    big = collate(ds, rows, 64)
    micro = [collate(ds, rows[i:i + 2], 64) for i in range(0, 8, 2)]
    n_per_micro = [(m["labels"][:, 1:] != -100).sum().item() for m in micro]
    assert len(set(n_per_micro)) > 1, "test needs unequal token counts per micro-batch"

    # Reference: HF-style mean over all supervised tokens of the 8 rows.
    model.zero_grad()
    ref = model(input_ids=big["input_ids"], attention_mask=big["attention_mask"], labels=big["labels"]).loss
    ref.backward()
    ref_grad = _grads(model).clone()

    params = [p for p in model.parameters() if p.requires_grad]
    obj = SFTObjective(TrainConfig())
    for batches in ([big], micro):
        model.zero_grad()
        stats, _, _ = accumulate_gradients(obj, model, batches, len(batches), torch.device("cpu"),
                                           micro_scale=1 / 128)
        finish_gradients(params, float(stats[1]), 1, 1 / 128, grad_clip=0)
        assert float(stats[0] / stats[1]) == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(_grads(model), ref_grad, rtol=1e-4, atol=1e-6)

    # The naive loop (mean per micro-batch, then average) is measurably different here.
    model.zero_grad()
    naive = sum(model(**{k: m[k] for k in ("input_ids", "attention_mask", "labels")}).loss for m in micro) / 4
    assert abs(naive.item() - ref.item()) > 1e-3


# -- end-to-end runs -------------------------------------------------------------------------------

def test_pretrain_run_learns_and_writes_everything(workdir):
    cfg = make_cfg(workdir, "run", max_steps=30, eval_every=15, save_every=10, keep_last=2,
                   data_val=str(workdir / "pretrain.jsonl"), eval_batches=4, sample_every=15,
                   sample_prompts=["the cat"], sample_max_new_tokens=4)
    summary = train(cfg, log=lambda *a: None)
    out = Path(cfg.out_dir)
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens_seen", "elapsed_s", "peak_mem_mb"):
        assert all(isinstance(r[key], (int, float)) for r in steps), key
    assert 29 * 4 * 64 < steps[-1]["tokens_seen"] <= 30 * 4 * 64  # the last row may be shorter
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2
    samples = [r for r in rows if "sample" in r]
    assert [r["step"] for r in samples] == [15, 30]
    # The last sample is what the saved model says (no stale decode copy of the weights: fused AdamW
    # updates them without bumping their version counters).
    from transformers import AutoTokenizer

    from tinylm.models.model import TinyLMForCausalLM

    final = TinyLMForCausalLM.from_pretrained(str(out / "final")).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    ids = torch.tensor([tok.encode("the cat", add_special_tokens=False)])
    with torch.no_grad():
        gen = final.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id or 0)
    assert samples[-1]["sample"] == tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=False)
    ln_v = math.log(6400)
    assert steps[0]["loss"] > 0.9 * ln_v
    assert steps[-1]["loss"] < 0.5 * ln_v and vals[-1] < 0.5 * ln_v, (steps[-1]["loss"], vals[-1])
    assert summary["step"] == 30
    # warmup then cosine decay to lr / 10
    assert steps[0]["lr"] == pytest.approx(1.5e-3) and 3e-4 < steps[-1]["lr"] < 3.1e-4
    assert steps[1]["lr"] == pytest.approx(3e-3)
    # resolved config, checkpoints (last 2 kept), final HF directory with tokenizer
    assert load_config(out / "config.yaml").max_steps == 30
    assert [p.name for p in list_checkpoints(out)] == ["step_0000020", "step_0000030"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    state = load_checkpoint(latest_checkpoint(out), m, restore_rng=False)
    assert state["step"] == 30
    # a second fresh run into the same out_dir refuses to mix checkpoints
    with pytest.raises(ValueError, match="resume=true"):
        train(cfg, log=lambda *a: None)


class StopAt(LMObjective):
    """Pretraining objective that simulates a crash (or a NaN) at a given forward call."""

    def __init__(self, cfg, at: int, nan: bool = False):
        super().__init__(cfg)
        self.calls, self.at, self.nan = 0, at, nan

    def loss(self, model, batch):
        self.calls += 1
        loss_sum, n, m = super().loss(model, batch)
        if self.calls >= self.at:
            if not self.nan:
                raise KeyboardInterrupt("simulated crash")
            loss_sum = loss_sum * float("nan")
        return loss_sum, n, m


def test_resume_reproduces_uninterrupted_run(workdir):
    full = make_cfg(workdir, "full", max_steps=8, save_every=3, grad_accum=2)
    train(full, log=lambda *a: None)
    part = make_cfg(workdir, "part", max_steps=8, save_every=3, grad_accum=2)
    with pytest.raises(KeyboardInterrupt):
        train(part, StopAt(part, at=2 * 5 + 1), log=lambda *a: None)  # dies inside step 6
    assert latest_checkpoint(part.out_dir).name == "step_0000003"
    part.resume = True
    train(part, log=lambda *a: None)
    assert losses(part.out_dir) == losses(full.out_dir)  # exact on CPU
    assert len(losses(full.out_dir)) == 8


def test_nonfinite_loss_stops_and_keeps_checkpoint(workdir):
    from tinylm.evaluation.report import diagnose, load_run

    cfg = make_cfg(workdir, "nan", max_steps=10, save_every=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 4.*step_0000002"):
        train(cfg, StopAt(cfg, at=4, nan=True), log=lambda *a: None)
    from tinylm.models.loading import load_model
    model, _ = load_model(str(workdir / "model"))
    load_checkpoint(latest_checkpoint(cfg.out_dir), model, restore_rng=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The stop is on record (strict JSON) and the report diagnoses it, pointing at the kept checkpoint.
    rows = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
    assert rows[-1]["nonfinite"] == "loss" and rows[-1]["loss"] == "nan" and rows[-1]["step"] == 4
    json.loads((Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()[-1],
               parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    findings = diagnose(load_run(cfg.out_dir), vocab_size=6400)
    assert findings[0].kind == "divergence", findings
    assert "step 4" in findings[0].message and "step_0000002" in findings[0].message


def test_real_divergence_is_diagnosed(workdir):
    """A learning rate far too high, end to end: train stops, report says divergence (not underfitting)."""
    from tinylm.evaluation.report import diagnose, load_run

    cfg = make_cfg(workdir, "diverge", max_steps=40, lr=1e4, grad_clip=0.0, warmup_steps=1)
    with pytest.raises(NonFiniteLossError):
        train(cfg, log=lambda *a: None)
    kinds = [f.kind for f in diagnose(load_run(cfg.out_dir), vocab_size=6400)]
    assert kinds[0] == "divergence" and "underfit" not in kinds, kinds


def test_epochs_bound_a_time_budgeted_run(workdir):
    """time_budget_min is a cap: with epochs=1 the run still ends after one pass over the data."""
    one_epoch = make_cfg(workdir, "epoch", max_steps=0, epochs=1.0, batch_size=8)
    capped = make_cfg(workdir, "epoch_budget", max_steps=0, epochs=1.0, batch_size=8, time_budget_min=30.0)
    a, b = train(one_epoch, log=lambda *a: None), train(capped, log=lambda *a: None)
    rows = len(LMObjective(one_epoch).batches("train", 0, 1))
    assert a["step"] == b["step"] == rows  # 1 epoch = every packed row once
    assert losses(one_epoch.out_dir) == losses(capped.out_dir)


def test_best_checkpoint_kept_beyond_keep_last(workdir):
    cfg = make_cfg(workdir, "best", max_steps=12, eval_every=2, save_every=2, keep_last=1, lr=3e-2,
                   data_val=str(workdir / "pretrain.jsonl"), eval_batches=2)
    train(cfg, log=lambda *a: None)
    val = [(r["step"], r["val_loss"]) for r in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if "val_loss" in r]
    best_step, best_val = min(val, key=lambda x: x[1])
    info = json.loads((Path(cfg.out_dir) / "best" / "training_info.json").read_text())
    assert info["step"] == best_step and info["val_loss"] == pytest.approx(best_val, abs=1e-6)
    from tinylm.models.loading import load_model
    model, _ = load_model(str(Path(cfg.out_dir) / "best"))  # a complete HF model directory
    assert sum(p.numel() for p in model.parameters()) > 0


def test_optimizer_decays_matrices_only(workdir):
    from tinylm.models.loading import load_model
    from tinylm.training.loop_parts import build_optimizer

    model, _ = load_model(str(workdir / "model"))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay and all(n.endswith("proj.weight") for n in decay), decay
    assert "model.embed_tokens.weight" in no_decay and all("norm" in n or "embed" in n for n in no_decay), no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_pretrain_on_bundled_data_learns(tmp_path):
    """The shipped corpus, shipped tokenizer, preset `tiny`: loss falls well below ln(vocab)."""
    cfg = load_config(REPO / "recipes" / "pretrain.yaml", [
        f"out_dir={tmp_path / 'run'}", "max_steps=50", "seq_len=128", "batch_size=16", "warmup_steps=5",
        "eval_every=0", "save_every=0", "sample_every=0", "log_every=5", "dtype=fp32",
        f"data.train={REPO / 'data/pretrain/train.jsonl'}", f"data.val={REPO / 'data/pretrain/val.jsonl'}"])
    result = train(cfg, log=lambda *a: None)
    ln_v = math.log(6400)
    first = losses(cfg.out_dir)[0]
    assert first > 0.95 * ln_v  # starts at the uniform guess
    # 100k tokens in: held-out perplexity at least e^1.5 = 4.5x better than a uniform guess (ppl 6400)
    assert result["val_loss"] < ln_v - 1.5, (result, ln_v)


def test_checkpoint_save_is_atomic(workdir, monkeypatch):
    from tinylm.models.loading import load_model

    model, _ = load_model(str(workdir / "model"))
    opt = torch.optim.AdamW(model.parameters())
    out = workdir / "atomic"
    save_checkpoint(out, 1, model, opt, {"step": 1, "tokens_seen": 0})
    real_save = torch.save

    def crash(obj, f, *a, **k):
        if str(getattr(f, "name", f)).endswith("trainer_state.pt"):  # a path, or the open file it writes
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(out, 2, model, opt, {"step": 2, "tokens_seen": 0})
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001"]
    fresh, _ = load_model(str(workdir / "model"))
    assert load_checkpoint(latest_checkpoint(out), fresh)["step"] == 1
    ref, _ = load_model(str(workdir / "model"))
    torch.testing.assert_close(dict(fresh.state_dict()), dict(ref.state_dict()))


def test_moe_logs_aux_loss_and_expert_load(workdir):
    cfg = make_cfg(workdir, "moe", model="tiny-moe", max_steps=2, seq_len=32, batch_size=2, log_every=2)
    train(cfg, log=lambda *a: None)
    row = [r for r in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if "loss" in r][-1]
    assert row["aux_loss"] > 0
    assert set(row["expert_load"]) == {f"layer_{i}" for i in range(4)}
    assert all(abs(sum(v) - 1) < 1e-4 for v in row["expert_load"].values())


def test_grad_checkpointing_gives_same_losses(workdir):
    a = make_cfg(workdir, "ckpt_off", max_steps=3, seq_len=32)
    b = make_cfg(workdir, "ckpt_on", max_steps=3, seq_len=32, grad_checkpointing=True)
    train(a, log=lambda *a: None)
    train(b, log=lambda *a: None)
    assert losses(a.out_dir) == pytest.approx(losses(b.out_dir), rel=1e-5)


def test_torch_compile_gives_same_losses(workdir):
    a = make_cfg(workdir, "compile_off", max_steps=3, seq_len=32)
    b = make_cfg(workdir, "compile_on", max_steps=3, seq_len=32, compile=True)
    train(a, log=lambda *a: None)
    train(b, log=lambda *a: None)
    assert losses(a.out_dir) == pytest.approx(losses(b.out_dir), rel=1e-4)


def test_bf16_autocast_on_cpu_trains(workdir):
    cfg = make_cfg(workdir, "bf16", max_steps=3, dtype="bf16", seq_len=32)
    train(cfg, log=lambda *a: None)
    rows = [r for r in read_metrics(Path(cfg.out_dir) / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(6400), rel=0.05)


# -- DDP -------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_single_process(workdir):
    """2 ranks x batch 2 == 1 process x batch 4 (same global batch -> same losses)."""
    single = make_cfg(workdir, "single", max_steps=4, batch_size=4, grad_accum=2)
    train(single, log=lambda *a: None)
    ddp = make_cfg(workdir, "ddp", max_steps=4, batch_size=2, grad_accum=2)
    from tinylm.training.trainconfig import save_config
    save_config(ddp, workdir / "ddp.yaml")
    script = workdir / "ddp_train.py"
    script.write_text(textwrap.dedent("""
        import sys
        from tinylm.train import train
        from tinylm.training.trainconfig import load_config
        train(load_config(sys.argv[1]), log=lambda *a: None)
        import torch.distributed as dist
        dist.destroy_process_group()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(script), str(workdir / "ddp.yaml")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(single.out_dir), losses(ddp.out_dir)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # AdamW + clipping hide a wrong gradient scale from the losses; the logged norm does not.
    norms = [[r["grad_norm"] for r in read_metrics(Path(c.out_dir) / "metrics.jsonl") if "loss" in r]
             for c in (single, ddp)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_auto_dtype_uses_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    from tinylm.training import loop_parts

    real_check = loop_parts.cpu_has_native_bf16
    assert real_check() is False  # conftest sets TINYLM_CPU_FP32=1
    monkeypatch.delenv("TINYLM_CPU_FP32")
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert real_check() == any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))
    cfg = TrainConfig(dtype="auto")
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop_parts, "cpu_has_native_bf16", lambda: True)
    assert loop_parts.autocast_settings(cfg, cpu) == (torch.bfloat16, False)
    monkeypatch.setattr(loop_parts, "cpu_has_native_bf16", lambda: False)
    assert loop_parts.autocast_settings(cfg, cpu) == (None, False)
    cfg.dtype = "fp32"
    monkeypatch.setattr(loop_parts, "cpu_has_native_bf16", lambda: True)
    assert loop_parts.autocast_settings(cfg, cpu) == (None, False)


def test_tensorboard_and_wandb_receive_metrics(workdir, monkeypatch):
    """report_to sends every scalar (and the sample texts) to the dashboard; stand-in modules record calls."""
    import types

    calls: dict[str, list] = {"scalar": [], "text": [], "wandb": [], "closed": []}

    class Writer:
        def __init__(self, log_dir):
            calls["log_dir"] = log_dir

        def add_scalar(self, k, v, step):
            calls["scalar"].append((k, step))

        def add_text(self, tag, text, step):
            calls["text"].append((tag, step))

        def close(self):
            calls["closed"].append("tb")

    class WandbRun:
        def log(self, row, step):
            calls["wandb"].append((sorted(row), step))

        def finish(self):
            calls["closed"].append("wandb")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.setdefault("init", kw)
                                                                       and WandbRun()))
    cfg = make_cfg(workdir, "tb", max_steps=2, report_to="tensorboard", sample_prompts=["the cat"],
                   sample_every=2, sample_max_new_tokens=3)
    train(cfg, log=lambda *a: None)
    assert ("loss", 1) in calls["scalar"] and ("lr", 2) in calls["scalar"] and ("tokens_per_s", 2) in calls["scalar"]
    assert calls["text"] == [("samples", 2)] and calls["log_dir"].endswith("tensorboard") and "tb" in calls["closed"]
    cfg = make_cfg(workdir, "wb", max_steps=2, report_to="wandb", run_name="demo")
    train(cfg, log=lambda *a: None)
    assert calls["init"]["name"] == "demo" and calls["init"]["config"]["max_steps"] == 2
    assert any("loss" in keys and step == 2 for keys, step in calls["wandb"]) and "wandb" in calls["closed"]


def test_checkpoint_is_a_model_directory(workdir):
    """A full-weight checkpoint also holds config.json + tokenizer: chat / eval / export load it directly."""
    from tinylm.cli import main
    from tinylm.models.loading import load_model

    cfg = make_cfg(workdir, "ckdir", max_steps=4, save_every=2, keep_last=2)
    train(cfg, log=lambda *a: None)
    ckpt = latest_checkpoint(cfg.out_dir)
    assert ckpt.name == "step_0000004"
    a, tok = load_model(str(ckpt))
    b, _ = load_model(str(Path(cfg.out_dir) / "final"))
    x = torch.tensor([tok.encode("the cat sat")])
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits)
    assert main(["info", str(ckpt)]) == 0
    fresh, _ = load_model(str(workdir / "model"))
    assert load_checkpoint(ckpt, fresh)["step"] == 4  # still a resumable checkpoint
