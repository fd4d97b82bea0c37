"""Training metrics: a JSONL file you can `tail -f`, a one-line progress report, optional dashboards.

`out_dir/metrics.jsonl` holds one JSON object per logged step (`step`, `loss`, `lr`,
`tokens_per_s`, `grad_norm`, `tokens_seen`, `elapsed_s`, `peak_mem_mb`, ...) and one per
validation (`step`, `val_loss`). It is the source of truth: `tinylm report` plots it, and it
survives resumes (rows are appended; a resumed run first drops rows past its checkpoint step).
TensorBoard and Weights & Biases are used only when asked for (`report_to`) AND installed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Any


def peak_memory_mb(device: Any = None) -> float:
    """Peak accelerator memory (CUDA) or peak resident set size of this process (CPU), in MiB."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# Stage metrics worth a glance on the console, in this order: (key in the row, label). GRPO's loss is
# ~0 on-policy whatever happens, so its reward is the number to watch; DPO's loss hides whether the
# pairs are ranked right, its margin and accuracy show it (TRL logs the same names).
PROGRESS_EXTRAS = (("reward", "reward"), ("reward_std", "reward_std"), ("rewards/margins", "margin"),
                   ("rewards/accuracies", "acc"), ("kl", "kl"))


def progress_line(row: dict[str, Any], max_steps: int, eta_s: float) -> str:
    """`step 120/1000 | loss 3.2104 | lr 9.8e-04 | 5.1k tok/s | data 0.4 ms | gnorm 0.91 | eta 3m05s`.

    GRPO adds `reward 1.0312 | reward_std 0.2147`, DPO `margin 0.8123 | acc 0.88`, when the row has them.
    """
    total = f"/{max_steps}" if max_steps else ""
    parts = [f"step {row['step']}{total}", f"loss {row['loss']:.4f}"]
    parts += [f"{label} {row[key]:.4f}" if key != "rewards/accuracies" else f"{label} {row[key]:.2f}"
              for key, label in PROGRESS_EXTRAS if isinstance(row.get(key), (int, float))]
    parts.append(f"lr {row['lr']:.2e}")
    tps = row.get("tokens_per_s", 0.0)
    parts.append(f"{tps / 1000:.2f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s")
    if "data_ms" in row:
        parts.append(f"data {row['data_ms']:.1f} ms")
    if row.get("grad_norm") is not None:
        parts.append(f"gnorm {row['grad_norm']:.2f}")
    if row.get("aux_loss"):
        parts.append(f"aux {row['aux_loss']:.4f}")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes metrics rows to JSONL (+ TensorBoard / W&B). Only rank 0 should own an enabled logger."""

    def __init__(self, out_dir: str | os.PathLike, report_to: str = "none", run_name: str = "",
                 config: dict | None = None, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh file
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
            except ImportError:
                warnings.warn("report_to=tensorboard but tensorboard is not installed; "
                              "logging to metrics.jsonl only (pip install tensorboard)", stacklevel=2)
        elif report_to == "wandb":
            try:
                import wandb
                self.wandb = wandb.init(project="tinylm", name=run_name or Path(out_dir).name, config=config,
                                        dir=str(out_dir), resume="allow")
            except ImportError:
                warnings.warn("report_to=wandb but wandb is not installed; "
                              "logging to metrics.jsonl only (pip install wandb)", stacklevel=2)

    def _truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (they belong to the part of the run being redone)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean, ensure_ascii=False) + "\n")
        step = int(clean.get("step", 0))
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if k != "step"}, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
