"""`tinylm report`: plots, a learning-curve diagnosis and a Markdown report for training runs.

Why: a loss curve is the first thing to read after training, and the classic advice for reading
it (Karpathy, "A Recipe for Training Neural Networks" 2019; Goodfellow et al., Deep Learning ch. 11;
Google's Deep Learning Tuning Playbook 2023) fits in a few rules that are easy to check by program:
  underfitting  training loss flat or still close to ln(vocab), the loss of a uniform guess
  overfitting   validation loss turns up while training loss keeps falling -> use the best checkpoint
  divergence    loss becomes NaN/inf, or climbs far back above its minimum
  LR too high   repeated loss spikes well above the running median
  well fit      loss fell a lot, validation tracks training, no spikes
Every finding is printed as a sentence with its evidence (values and steps), so users can check it.

Inputs: `RUN_DIR/metrics.jsonl` (rows with step, loss, lr, tokens_per_s, grad_norm, ...; validation
rows with val_loss; MoE rows may carry expert_load) and `RUN_DIR/config.yaml`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    """Metrics of one run, split into training rows and validation rows."""

    path: Path
    name: str
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    skipped_lines: int = 0


@dataclass
class Finding:
    kind: str  # divergence | spikes | overfit | underfit | still_improving | good | no_data
    message: str


def load_run(run_dir: str | Path) -> Run:
    import yaml

    path = Path(run_dir)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics file (is {path} a training out_dir?)")
    run = Run(path, path.resolve().name)
    for line in metrics.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            run.skipped_lines += 1  # e.g. a line being written right now
            continue
        if not isinstance(row, dict) or "step" not in row:
            run.skipped_lines += 1
            continue
        if row.get("val_loss") is not None:
            run.val.append(row)
        if row.get("nonfinite"):  # `tinylm train` stopped on NaN/inf: strict JSON has them as strings
            row = {**row, **{k: float(row[k]) for k in ("loss", "grad_norm") if isinstance(row.get(k), str)}}
        if row.get("loss") is not None:
            run.train.append(row)
    cfg = path / "config.yaml"
    if cfg.is_file():
        try:
            run.config = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{cfg}: invalid YAML ({e})") from None
    return run


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def smooth(values: list[float], beta: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing slider)."""
    if beta is None:
        beta = min(0.98, max(0.0, 1 - 30 / max(1, len(values))))  # ~3% of the run: little lag
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


def vocab_size_of(run: Run) -> int | None:
    """Vocabulary size from final/ or a checkpoint's config.json, config.yaml, or the preset."""
    for cfg in [run.path / "final" / "config.json", *sorted(run.path.glob("checkpoints/step_*/config.json"))]:
        try:
            v = json.loads(cfg.read_text()).get("vocab_size")
            if isinstance(v, int):
                return v
        except (OSError, json.JSONDecodeError):
            continue

    def find(d):
        if isinstance(d, dict):
            for k, v in d.items():
                r = v if k == "vocab_size" and isinstance(v, int) else find(v)
                if r:
                    return r
        return None

    if found := find(run.config):
        return found
    model = run.config.get("model")
    if isinstance(model, str):
        try:
            from tinylm.models.config import PRESETS, preset_config

            if model in PRESETS:
                return preset_config(model).vocab_size
        except Exception:  # noqa: BLE001 - optional hint only
            return None
    return None


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    out = {}
    for p in (run_dir / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def _nearest_ckpt(run_dir: Path, step: int) -> str:
    info = run_dir / "best" / "training_info.json"
    if step >= 0 and info.is_file():  # `keep_best`: the weights of the lowest validation loss
        try:
            best_step = json.loads(info.read_text(encoding="utf-8")).get("step")
        except (OSError, json.JSONDecodeError):
            best_step = None
        if best_step == step:
            return f"{run_dir / 'best'} (the weights of step {step})"
    ckpts = checkpoint_steps(run_dir)
    if not ckpts:
        return "no checkpoints are left in checkpoints/ (raise keep_last or save_every to keep the best one)"
    best = min(ckpts, key=lambda s: (abs(s - step), s))
    note = "" if best == step else f" (nearest saved to step {step}; saved steps: {sorted(ckpts)})"
    return f"{ckpts[best]}{note}"


RL_NOTES = {
    "ppo": "PPO: the loss is the clipped surrogate + value loss of each minibatch, not a learning curve; judge "
           "the run by reward / val_reward (reward.png), kl (kl.png) and explained_variance.",
    "reward": "Reward model: the loss is the Bradley-Terry loss; judge the run by held-out val_accuracy against "
              "val_length_baseline_accuracy (rm_accuracy.png).",
}


@dataclass
class _Curve:
    """The finite part of a training-loss curve, with the summaries every check reads."""

    run: Run
    rows: list[dict]
    steps: list[int]
    loss: list[float]
    sm: list[float]  # smoothed loss
    k5: int  # rows in the first / last 5%
    start: float  # median loss of the first 5% of rows: robust to noise and lag
    final: float  # ... and of the last 5%

    @classmethod
    def of(cls, run: Run, rows: list[dict]) -> _Curve:
        loss = [float(r["loss"]) for r in rows]
        k5 = max(3, len(loss) // 20)
        return cls(run, rows, [r["step"] for r in rows], loss, smooth(loss), k5,
                   statistics.median(loss[:k5]), statistics.median(loss[-k5:]))

    def smoothed_at(self, step: int) -> float:
        return self.sm[min(range(len(self.steps)), key=lambda j: abs(self.steps[j] - step))]


def diagnose(run: Run, vocab_size: int | None = None) -> list[Finding]:
    """Learning-curve findings, each with its evidence. Each check below looks for one failure mode."""
    rows = run.train
    if len(rows) < 5 and not any(r.get("nonfinite") for r in rows):
        return [Finding("no_data", f"Only {len(rows)} training rows in metrics.jsonl: too few to diagnose.")]
    findings, good_rows = _check_nonfinite(run)
    if len(good_rows) < 5:
        return findings
    if run.config.get("stage") in RL_NOTES:  # their loss is no next-token loss: the LM checks below mislead
        return findings + [Finding("good", RL_NOTES[run.config["stage"]])]
    c = _Curve.of(run, good_rows)
    findings += _check_spikes(c)
    if not findings or findings[0].kind != "divergence":  # a NaN divergence was reported already
        findings += _check_climb_back(c)
    findings += _check_overfit(c)
    findings += _check_underfit(c, vocab_size, findings)
    findings += _check_still_improving(c, findings)
    if not any(f.kind in ("divergence", "spikes", "overfit", "underfit") for f in findings):
        findings.append(_well_fit(c))
    return findings


def _check_nonfinite(run: Run) -> tuple[list[Finding], list[dict]]:
    """A NaN/inf loss or gradient norm: report it; later checks see only the rows before it."""
    rows = run.train
    bad = next((r for r in rows if not _finite(r["loss"]) or (r.get("grad_norm") is not None and not r.get("amp_overflow")
                                                              and not _finite(r["grad_norm"]))), None)
    good_rows = [r for r in rows if _finite(r["loss"])]
    if bad is None:
        return [], good_rows
    before = [r for r in good_rows if r["step"] < bad["step"]]
    last = f"the last finite loss was {before[-1]['loss']:.4f} at step {before[-1]['step']}" if before else "no finite loss before it"
    what = "loss" if not _finite(bad["loss"]) else "gradient norm"
    return [Finding("divergence", (
        f"Divergence: the training {what} became {bad.get('loss') if what == 'loss' else bad.get('grad_norm')} "
        f"at step {bad['step']} (lr {bad.get('lr', float('nan')):.2e}); {last}. Lower the learning rate or "
        f"lengthen warmup, keep grad_clip on, prefer bf16 over fp16, and resume from "
        f"{_nearest_ckpt(run.path, before[-1]['step'] if before else 0)}."))], before


def _check_spikes(c: _Curve) -> list[Finding]:
    """Loss spikes: raw loss well above the running median of the previous window."""
    n, loss = len(c.loss), c.loss
    w = max(5, n // 50)
    spikes = []
    for i in range(w, n):
        med = statistics.median(loss[i - w:i])
        mad = statistics.median(abs(x - med) for x in loss[i - w:i]) or 1e-3 * med
        if loss[i] > 1.25 * med and loss[i] - med > 6 * mad:
            spikes.append((loss[i] / med, i, med))
    if not (len(spikes) >= 3 or any(s[0] > 2 for s in spikes)):
        return []
    ratio, i, med = max(spikes)
    return [Finding("spikes", (
        f"Learning rate likely too high: {len(spikes)} loss spike(s) above 1.25x the running median; the "
        f"largest at step {c.steps[i]} (loss {loss[i]:.4f} vs median {med:.4f}, {ratio:.1f}x) with lr "
        f"{c.rows[i].get('lr', float('nan')):.2e}. Try a lower peak lr, longer warmup or a smaller grad_clip."))]


def _check_climb_back(c: _Curve) -> list[Finding]:
    """Divergence without NaN: the smoothed loss climbs far back above its minimum."""
    n = len(c.loss)
    i_min = min(range(n), key=c.sm.__getitem__)
    if not (i_min < int(0.9 * n) and c.final > 1.2 * c.sm[i_min] and c.final - c.sm[i_min] > 0.3):
        return []
    return [Finding("divergence", (
        f"Divergence: the smoothed training loss fell to {c.sm[i_min]:.4f} at step {c.steps[i_min]} and climbed back "
        f"to {c.final:.4f} at step {c.steps[-1]} (+{100 * (c.final / c.sm[i_min] - 1):.0f}%). Lower the learning rate "
        f"and resume from {_nearest_ckpt(c.run.path, c.steps[i_min])}."))]


def _check_overfit(c: _Curve) -> list[Finding]:
    """Overfitting: validation loss turns up while training loss keeps falling."""
    val = [(r["step"], float(r["val_loss"])) for r in c.run.val if _finite(r["val_loss"])]
    if len(val) < 3:
        return []
    b_step, b_val = min(val, key=lambda x: x[1])
    l_step, l_val = val[-1]
    if not (l_step > b_step and l_val > b_val * 1.02 + 0.01 and c.smoothed_at(l_step) < c.smoothed_at(b_step)):
        return []
    return [Finding("overfit", (
        f"Overfitting: validation loss was lowest ({b_val:.4f}) at step {b_step} and rose to {l_val:.4f} at "
        f"step {l_step} (+{100 * (l_val / b_val - 1):.1f}%) while training loss kept falling "
        f"({c.smoothed_at(b_step):.4f} -> {c.smoothed_at(l_step):.4f}); the gap is now "
        f"{l_val - c.smoothed_at(l_step):.4f}. Use the best checkpoint: {_nearest_ckpt(c.run.path, b_step)}. Train "
        f"fewer steps/epochs, add data or regularise (weight decay, dropout, smaller LoRA rank)."))]


def _check_underfit(c: _Curve, vocab_size: int | None, found: list[Finding]) -> list[Finding]:
    """Underfitting: flat, or close to the uniform-guess loss ln(V)."""
    drop = (c.start - c.final) / c.start if c.start > 0 else 0.0
    ln_v = math.log(vocab_size) if vocab_size else None
    if any(f.kind in ("overfit", "divergence") for f in found):  # "raise the lr" would contradict them
        return []
    if not (drop < 0.1 or (ln_v and c.final > 0.8 * ln_v)):
        return []
    ref = (f"; ln(vocab={vocab_size}) = {ln_v:.2f} is the loss of a uniform guess and the final loss is "
           f"{100 * c.final / ln_v:.0f}% of it") if ln_v else ""
    return [Finding("underfit", (
        f"Underfitting: training loss went from {c.start:.4f} to {c.final:.4f} over steps "
        f"{c.steps[0]}-{c.steps[-1]}, a {100 * drop:.1f}% drop{ref}. Train longer, raise the learning rate or "
        f"use a bigger model; check that the data and labels are right."))]


def _check_still_improving(c: _Curve, found: list[Finding]) -> list[Finding]:
    """Still improving at the end: more steps would help."""
    j = int(0.8 * len(c.loss))
    before = statistics.median(c.loss[max(0, j - c.k5):j + 1])
    if before <= 0 or (before - c.final) / before <= 0.02 or any(f.kind in ("divergence", "overfit") for f in found):
        return []
    return [Finding("still_improving", (
        f"Still improving: the training loss fell {100 * (before - c.final) / before:.1f}% over the last 20% of the "
        f"run (step {c.steps[j]} -> {c.steps[-1]}: {before:.4f} -> {c.final:.4f}); more steps would likely help."))]


def _well_fit(c: _Curve) -> Finding:
    drop = (c.start - c.final) / c.start if c.start > 0 else 0.0
    gap = ""
    if val := [(r["step"], float(r["val_loss"])) for r in c.run.val if _finite(r["val_loss"])]:
        l_step, l_val = val[-1]
        gap = f"; validation loss {l_val:.4f} at step {l_step} tracks it (gap {l_val - c.smoothed_at(l_step):+.4f})"
    return Finding("good", (
        f"Well fit: training loss fell from {c.start:.4f} to {c.final:.4f} ({100 * drop:.0f}% drop) without spikes"
        f"{gap}."))


# ---------------------------------------------------------------------------------------------
# Plots

def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _expert_load(rows: list[dict]) -> tuple[list[int], list[list[float]]]:
    """Per-expert load (mean over layers when nested) per logged step."""
    steps, loads = [], []
    for r in rows:
        v = r.get("expert_load")
        if isinstance(v, dict):
            v = list(v.values())
        if not isinstance(v, list) or not v:
            continue
        if isinstance(v[0], list):
            v = [statistics.fmean(col) for col in zip(*v)]
        steps.append(r["step"])
        loads.append([float(x) for x in v])
    return steps, loads


def _rows_with(run: Run, key: str) -> list[dict]:
    """Training rows with `key`, or (validation metrics without a val_loss, e.g. GRPO's val_reward)
    the matching rows of metrics.jsonl, which load_run does not keep."""
    rows = [r for r in run.train if key in r]
    if rows or not key.startswith("val_"):
        return rows
    out = []
    path = run.path / "metrics.jsonl"
    for line in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else []):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row and _finite(row.get(key)):
            out.append(row)
    return out


def plot_runs(runs: list[Run], out_dir: str | Path) -> list[Path]:
    """Write loss / val_loss / lr / throughput / grad_norm (/ reward, DPO margins and accuracy, expert_load)
    PNGs; several runs share axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def save(fig, name: str) -> None:
        path = out / name
        tmp = out / f".{name}.tmp.png"
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)

    specs = [("loss", "loss (nats/token)", "loss.png"), ("val_loss", "validation loss", "val_loss.png"),
             ("lr", "learning rate", "lr.png"), ("tokens_per_s", "tokens / s", "throughput.png"),
             ("grad_norm", "gradient norm (before clipping)", "grad_norm.png")]
    for key, title, fname in specs:
        src = "val" if key == "val_loss" else "train"
        if not any(_series(getattr(r, src), key)[0] for r in runs):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, run in enumerate(runs):
            x, y = _series(getattr(run, src), key)
            if not x:
                continue
            c = colors[k % len(colors)]
            if key == "loss":
                ax.plot(x, y, color=c, alpha=0.25, lw=0.8)
                ok = [(a, b) for a, b in zip(x, y) if math.isfinite(b)]
                ax.plot([a for a, _ in ok], smooth([b for _, b in ok]), color=c, lw=1.8, label=f"{run.name} (smoothed)")
                vx, vy = _series(run.val, "val_loss")
                if vx:
                    ax.plot(vx, vy, "o--", color=c, ms=3, lw=1, label=f"{run.name} val")
            else:
                ax.plot(x, y, color=c, marker="o" if key == "val_loss" else None, ms=3, label=run.name)
        if key == "grad_norm" and any(v > 0 for r in runs for v in _series(r.train, key)[1]):
            ax.set_yscale("log")  # (GRPO groups without reward variance give exactly 0)
        ax.set(xlabel="step", ylabel=title, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, fname)

    # Post-training curves, when the rows have them: GRPO's reward (its loss is ~0 on-policy) with the
    # held-out val_reward, DPO's reward margin and pair accuracy (as TRL logs them).
    post = [(("reward", "val_reward"), "mean reward (GRPO / PPO; val = held-out prompts)", "reward.png"),
            (("rewards/margins",), "DPO reward margin (chosen - rejected)", "dpo_margins.png"),
            (("rewards/accuracies",), "DPO accuracy (pairs ranked right)", "dpo_accuracy.png"),
            (("accuracy", "val_accuracy", "val_length_baseline_accuracy"),
             "reward model pairwise accuracy (val = held-out pairs)", "rm_accuracy.png"),
            (("kl",), "KL to the reference (PPO: summed over tokens)", "kl.png"),
            (("pg_loss", "vf_loss"), "PPO policy / value loss", "ppo_losses.png"),
            (("pg_clipfrac", "vf_clipfrac"), "PPO clip fractions", "ppo_clipfrac.png"),
            (("explained_variance",), "PPO value explained variance (1 = perfect)", "explained_variance.png"),
            (("completion_len",), "response length (tokens)", "completion_len.png")]
    for keys, title, fname in post:
        series = [[_series(_rows_with(run, k), k) for k in keys] for run in runs]
        if not any(x for per_run in series for x, _ in per_run):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, (run, per_run) in enumerate(zip(runs, series)):
            c = colors[k % len(colors)]
            for key, (x, y) in zip(keys, per_run):
                if not x:
                    continue
                if key.startswith("val_"):
                    ax.plot(x, y, "o--", color=c, ms=3, lw=1, label=f"{run.name} {key}")
                else:
                    ax.plot(x, y, color=c, alpha=0.25, lw=0.8)
                    ax.plot(x, smooth(y), color=c, lw=1.8, label=f"{run.name} {key} (smoothed)")
        ax.set(xlabel="step", ylabel=title.split(" (")[0], title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, fname)

    if any(_expert_load(r.train)[0] for r in runs):
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, run in enumerate(runs):
            x, loads = _expert_load(run.train)
            if not x:
                continue
            for e, col in enumerate(zip(*loads)):
                ax.plot(x, col, color=colors[k % len(colors)], alpha=0.6, lw=1,
                        label=f"{run.name} (one line per expert)" if e == 0 else None)
            ax.axhline(1 / len(loads[-1]), color="gray", ls=":", lw=1)
        ax.set(xlabel="step", ylabel="fraction of routed tokens", title="MoE expert load (dotted: uniform)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "expert_load.png")
    return written


# ---------------------------------------------------------------------------------------------
# Markdown

def _fmt(x, spec: str = ".4f") -> str:
    return format(x, spec) if _finite(x) else "n/a"


def summary_rows(run: Run) -> list[tuple[str, str]]:
    tr = run.train
    last = tr[-1] if tr else {}
    tps = [r["tokens_per_s"] for r in tr if _finite(r.get("tokens_per_s"))]
    finite = [float(r["loss"]) for r in tr if _finite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in run.val if _finite(r["val_loss"])]
    best = min(val, key=lambda v: v[1]) if val else None
    mem = [r["peak_mem_mb"] for r in tr if _finite(r.get("peak_mem_mb"))]
    rows = [("last step", str(last.get("step", "n/a"))),
            ("tokens seen", f"{last['tokens_seen']:,}" if _finite(last.get("tokens_seen")) else "n/a"),
            ("elapsed", f"{last['elapsed_s'] / 60:.1f} min" if _finite(last.get("elapsed_s")) else "n/a"),
            ("throughput (median)", f"{statistics.median(tps):,.0f} tokens/s" if tps else "n/a"),
            ("peak memory", f"{max(mem):,.0f} MiB" if mem else "n/a"),
            ("final train loss (raw / smoothed)", f"{_fmt(last.get('loss'))} / {_fmt(smooth(finite)[-1] if finite else None)}")]
    if val:
        rows += [("final val loss (ppl)", f"{val[-1][1]:.4f} ({math.exp(min(val[-1][1], 700)):.2f}) at step {val[-1][0]}"),
                 ("best val loss (ppl)", f"{best[1]:.4f} ({math.exp(min(best[1], 700)):.2f}) at step {best[0]}")]
    return rows


def _data_lines(cfg: dict) -> list[str]:
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    lines = [f"- {k}: `{v}`" for k, v in data.items() if v not in ("", None, [], {})]
    for k in ("stage", "model", "tokenizer", "seq_len", "batch_size", "grad_accum", "max_steps", "epochs", "lr"):
        if cfg.get(k) not in (None, ""):
            lines.append(f"- {k}: `{cfg[k]}`")
    if all(isinstance(cfg.get(k), int) for k in ("seq_len", "batch_size")):
        lines.append(f"- tokens per optimizer step (max): {cfg['seq_len'] * cfg['batch_size'] * int(cfg.get('grad_accum') or 1):,}")
    return lines or ["- (no config.yaml)"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Plots + `report.md` for one run (in run_dir, or out_dir if given); returns the report path."""
    import yaml

    run = load_run(run_dir)
    dest = Path(out_dir) if out_dir else run.path
    dest.mkdir(parents=True, exist_ok=True)
    plots = plot_runs([run], dest / "plots")
    findings = diagnose(run, vocab_size_of(run))
    md = [f"# Training report: {run.name}", "", f"Run directory: `{run.path}`", "", "## Summary", "",
          "| metric | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in summary_rows(run)]
    md += ["", "## Diagnosis", ""] + [f"- {f.message}" for f in findings]
    if run.skipped_lines:
        md.append(f"- ({run.skipped_lines} unreadable line(s) in metrics.jsonl were skipped.)")
    md += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(dest).as_posix()})" for p in plots]
    md += ["", "## Data", ""] + _data_lines(run.config)
    ckpts = checkpoint_steps(run.path)
    md += ["", "## Checkpoints", "", f"- saved steps: {sorted(ckpts) or 'none'}"]
    if (run.path / "final").is_dir():
        md.append(f"- final model: `{run.path / 'final'}` (evaluate: `tinylm eval {run.path / 'final'} --task ppl`)")
    if run.config:
        md += ["", "## Config", "", "```yaml", yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True).rstrip(), "```"]
    path = dest / "report.md"
    _write_atomic(path, "\n".join(md) + "\n")
    return path


def write_comparison(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """One set of plots with every run, and `compare.md` with a summary table and each diagnosis."""
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # same folder name in different parents
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{i}"
    dest = Path(out_dir)
    plots = plot_runs(runs, dest)
    table = [summary_rows(r) for r in runs]
    md = ["# Training runs compared", "", "| metric | " + " | ".join(r.name for r in runs) + " |",
          "|---|" + "---|" * len(runs)]
    for i, (label, _) in enumerate(table[0]):
        md.append(f"| {label} | " + " | ".join(t[i][1] if i < len(t) else "" for t in table) + " |")
    for r in runs:
        md += ["", f"## Diagnosis: {r.name}", ""] + [f"- {f.message}" for f in diagnose(r, vocab_size_of(r))]
    md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = dest / "compare.md"
    _write_atomic(path, "\n".join(md) + "\n")
    return path


def _cmd_report(args: argparse.Namespace) -> int:
    if len(args.run_dirs) == 1:
        path = write_report(args.run_dirs[0], args.out)
        run = load_run(args.run_dirs[0])
        print(f"{run.name}:")
        for f in diagnose(run, vocab_size_of(run)):
            print(f"  - {f.message}")
    else:
        path = write_comparison(args.run_dirs, args.out or "report_compare")
        for d in args.run_dirs:
            run = load_run(d)
            print(f"{run.name}:")
            for f in diagnose(run, vocab_size_of(run)):
                print(f"  - {f.message}")
    print(f"wrote {path}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plots, learning-curve diagnosis and report.md for training runs",
                       description="Plot metrics.jsonl of one or more runs and diagnose the learning curves.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training out_dir(s) with metrics.jsonl")
    p.add_argument("--out", help="output folder (default: RUN_DIR for one run, ./report_compare for several)")
    p.set_defaults(func=_cmd_report)
