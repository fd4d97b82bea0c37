"""`tinylm quickstart`: the whole pipeline on the bundled data, in about ten minutes on 2 CPU cores.

    bundled tokenizer -> pretrain `tiny` -> SFT (chat + identity) -> answers to held-out prompts
    -> training reports -> how to chat / serve / evaluate / export

Nothing here is special-cased: each step is the same code path as `tinylm train recipes/*.yaml`
with a few overrides, so the printed commands reproduce every stage by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _repo_file(rel: str) -> Path:
    path = REPO / rel
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found. The quickstart uses the recipes and data of a tinylm clone; "
            "install with `bash scripts/setup.sh` from the repository (editable install).")
    return path


def run_quickstart(out: str = "runs/quickstart", pretrain_steps: int | None = None, sft_steps: int | None = None,
                   dtype: str = "auto", fast: bool = False, overwrite: bool = False) -> dict:
    from tinylm.evaluation.report import write_report
    from tinylm.inference.chat import load_for_inference
    from tinylm.inference.generate import SamplingParams, generate
    from tinylm.train import train
    from tinylm.training.trainconfig import load_config

    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} already exists; pass --overwrite to replace it or --out NEW_DIR")
        shutil.rmtree(out_dir)
    t0 = time.time()
    pre_over = [f"out_dir={out_dir / 'pretrain'}", f"dtype={dtype}",
                f"data.train={_repo_file('data/pretrain/train.jsonl')}",
                f"data.val={_repo_file('data/pretrain/val.jsonl')}"]
    if pretrain_steps is not None:
        pre_over.append(f"max_steps={pretrain_steps}")
    if fast:
        pre_over += ["eval_every=1000000", "sample_every=1000000", "save_every=1000000"]
    print("== 1/4 pretrain a `tiny` model on the bundled zh/en corpus (recipes/pretrain.yaml)")
    pre_cfg = load_config(_repo_file("recipes/pretrain.yaml"), pre_over)
    train(pre_cfg)
    pre_final = out_dir / "pretrain" / "final"

    sft_over = [f"model={pre_final}", f"out_dir={out_dir / 'sft'}", f"dtype={dtype}",
                f"data.train={_repo_file('data/sft/train.jsonl')}", f"data.val={_repo_file('data/sft/val.jsonl')}"]
    if sft_steps is not None:
        sft_over.append(f"max_steps={sft_steps}")
    if fast:
        sft_over += ["eval_every=1000000", "sample_every=1000000", "save_every=1000000"]
    print("\n== 2/4 supervised fine-tuning on chat + identity data (recipes/sft.yaml)")
    sft_cfg = load_config(_repo_file("recipes/sft.yaml"), sft_over)
    train(sft_cfg)
    sft_final = out_dir / "sft" / "final"

    print("\n== 3/4 answers to held-out prompts (not in the training data)")
    prompts = [json.loads(line) for line in _repo_file("data/sft/heldout_prompts.jsonl").read_text().splitlines()
               if line.strip()]
    model, tok = load_for_inference(str(sft_final))
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    completions = generate(model, tok, [[{"role": "user", "content": p["prompt"]}] for p in prompts], params, chat=True)
    hits = 0
    for p, c in zip(prompts, completions):
        ok = p.get("expect", "").lower() in c.text.lower()
        hits += ok
        print(f"  [{'ok' if ok else '--'}] {p['prompt']}\n       -> {c.text.strip()}")
    print(f"  identity answers mentioning the expected name: {hits}/{len(prompts)}")

    print("\n== 4/4 training reports")
    reports = [write_report(out_dir / "pretrain"), write_report(out_dir / "sft")]
    for r in reports:
        print(f"  {r}")
    minutes = (time.time() - t0) / 60
    print(f"\nDone in {minutes:.1f} min. Next:\n"
          f"  tinylm chat {sft_final}                      # talk to it\n"
          f"  tinylm serve {sft_final} --port 8000         # web page + OpenAI API at http://127.0.0.1:8000\n"
          f"  tinylm eval {sft_final} --task ppl           # perplexity / bits per byte\n"
          f"  tinylm export {sft_final} --out {out_dir / 'hf'}  # plain transformers / llama.cpp\n")
    return {"identity_hits": hits, "identity_total": len(prompts), "minutes": minutes,
            "pretrain": str(pre_final), "sft": str(sft_final), "reports": [str(r) for r in reports]}


def _cmd_quickstart(args: argparse.Namespace) -> int:
    for flag, v in (("--pretrain-steps", args.pretrain_steps), ("--sft-steps", args.sft_steps)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    run_quickstart(args.out, args.pretrain_steps, args.sft_steps, args.dtype, fast=args.fast, overwrite=args.overwrite)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on bundled data (~10 min on 2 CPU cores)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override recipes/pretrain.yaml max_steps")
    p.add_argument("--sft-steps", type=int, default=None, help="override recipes/sft.yaml max_steps")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 (auto: bf16 autocast where it is faster)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--fast", action="store_true",
                   help="no validation, samples or checkpoints during training (final model and report only)")
    p.set_defaults(func=_cmd_quickstart)
