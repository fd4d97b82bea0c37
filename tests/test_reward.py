"""Reward models: Bradley-Terry loss vs TRL's RewardTrainer formula, last-token scoring, held-out metrics,
the export to transformers' *ForSequenceClassification (equal scores in a process without tinylm),
LoRA heads, `tinylm eval --task reward`, and the one-line errors for bad reward-model input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinylm.cli import main as cli_main
from tinylm.posttrain.reward import (
    bt_loss,
    check_same_tokenizer,
    last_token_index,
    length_baseline_accuracy,
    load_reward_model,
    sequence_rewards,
)
from tinylm.train import train
from tinylm.training.trainconfig import load_config

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["max_steps=3", "epochs=0", "batch_size=4", "seq_len=64", "warmup_steps=1", "log_every=1",
          "eval_every=0", "save_every=0", "dtype=fp32", "device=cpu"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from tinylm.export.interop import init_model

    root = tmp_path_factory.mktemp("rm")
    for name, qk in (("micro", False), ("micro_qk", True)):
        init_model("tiny", root / name, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, qk_norm=qk)
    return root


def train_rm(root: Path, name: str, *extra: str, model: str = "micro") -> Path:
    pairs = root / "pairs.jsonl"  # the first 40 bundled pairs: encoding all 900 would dominate the test time
    if not pairs.exists():
        lines = (ROOT / "data/posttrain/dpo.jsonl").read_text(encoding="utf-8").splitlines()
        pairs.write_text("\n".join(lines[:20] + lines[300:320]) + "\n", encoding="utf-8")
    cfg = load_config(ROOT / "recipes" / "reward.yaml", [*SHRINK, f"model={root / model}", f"out_dir={root / name}",
                                                         f"data.train={pairs}", *extra])
    return Path(train(cfg, log=lambda *a: None)["final"])


def test_bt_loss_matches_trl_formula():
    g = torch.Generator().manual_seed(0)
    rc, rr, m = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    for margin, coef in ((None, 0.0), (m, 0.0), (None, 0.01)):
        got = bt_loss(rc, rr, margin, coef).mean().item()
        # TRL RewardTrainer: -logsigmoid(r_c - r_r [- margin]).mean() + coef * mean((r_c + r_r)^2)
        want = sum(-math.log(1 / (1 + math.exp(-(a - b - (0 if margin is None else c)))))
                   for a, b, c in zip(rc.tolist(), rr.tolist(), m.tolist())) / 6
        want += coef * sum((a + b) ** 2 for a, b in zip(rc.tolist(), rr.tolist())) / 6
        assert got == pytest.approx(want, rel=1e-12)


def test_last_token_index_is_rightmost_non_pad():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 3, 4, 9, 8], [5, 0, 6, 0, 0]])
    want = [max(j for j, t in enumerate(row) if t != 0) for row in ids.tolist()]
    assert last_token_index(ids, 0).tolist() == want == [2, 4, 2]


def test_length_baseline():
    pairs = [{"chosen_mask": [1, 1, 1], "rejected_mask": [1]}, {"chosen_mask": [1], "rejected_mask": [1, 1]},
             {"chosen_mask": [1, 1], "rejected_mask": [1, 1]}]
    assert length_baseline_accuracy(pairs) == pytest.approx(0.5)


def test_export_scores_equal_in_plain_transformers(micro, tmp_path, capsys):
    """Llama (no QK-norm) and Qwen3 (QK-norm) sequence classifiers, loaded where tinylm is never imported."""
    cases = []
    for model, cls in (("micro", "LlamaForSequenceClassification"), ("micro_qk", "Qwen3ForSequenceClassification")):
        final = train_rm(micro, f"rm_{model}", model=model)
        out = tmp_path / model
        assert cli_main(["export", str(final), "--out", str(out)]) == 0
        stdout = capsys.readouterr().out
        assert cls in stdout and "AutoModelForSequenceClassification" in stdout
        rm, tok = load_reward_model(final)
        texts = ["<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n", "hello there"]
        rows = [tok(t)["input_ids"] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])           # right padding with pad id 0
        attn = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
        ours = sequence_rewards(rm, ids, attn, 0).tolist()
        assert abs(ours[0] - ours[1]) > 1e-6  # the two texts get different scores: the head is really read
        cases.append({"dir": str(out), "cls": cls, "ids": ids.tolist(), "attn": attn.tolist(), "ours": ours})
    script = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification
cases = json.loads(sys.argv[1])
for c in cases:
    m = AutoModelForSequenceClassification.from_pretrained(c["dir"]).eval()
    assert type(m).__name__ == c["cls"] and m.config.num_labels == 1 and m.config.pad_token_id == 0
    with torch.no_grad():
        c["theirs"] = m(input_ids=torch.tensor(c["ids"]), attention_mask=torch.tensor(c["attn"])).logits[:, 0].tolist()
assert not any(k.startswith("tinylm") for k in sys.modules)
print(json.dumps([c["theirs"] for c in cases]))
"""
    r = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for case, theirs in zip(cases, json.loads(r.stdout.strip().splitlines()[-1])):
        assert theirs == pytest.approx(case["ours"], abs=1e-5), case["cls"]


def test_training_logs_heldout_accuracy_and_lora_head(micro):
    final = train_rm(micro, "rm_lora", "lora.enabled=true", "lora.r=4", "max_steps=2")
    rows = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_accuracy" in r]
    assert val and 0 <= val[-1]["val_accuracy"] <= 1 and "val_length_baseline_accuracy" in val[-1]
    assert (final / "adapter_config.json").exists() and (final.parent / "score_head.safetensors").exists()
    rm, _ = load_reward_model(final)  # base + adapter merged, head from the run dir
    assert rm.score.weight.abs().sum() > 0


def test_eval_task_reward_prints_table(micro, tmp_path, capsys):
    final = micro / "rm_micro" / "final"
    if not final.exists():
        final = train_rm(micro, "rm_micro")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "a good long answer", "rejected": "bad"})
                              for i in range(5)) + "\n")
    assert cli_main(["eval", str(final), "--task", "reward", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "| model | pairs | accuracy % | length-only baseline % | mean margin |" in out
    assert "| final | 5 |" in out and "| 100.0 |" in out  # the longer answer always wins here


def test_bad_reward_model_input_is_one_line(micro, capsys):
    assert cli_main(["eval", str(micro / "micro"), "--task", "reward", "--data", str(ROOT / "data/posttrain/dpo.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinylm eval: error: ") and "no reward score head (score.weight" in err
    assert len(err.splitlines()) == 1

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    with pytest.raises(ValueError, match=r"rm: tokenizer mismatch with the policy \(3 vs 2 tokens; 1 only in"):
        check_same_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 1, "c": 2}), "rm")


def test_bundled_reward_and_ppo_data_splits(tmp_path):
    """data/posttrain is what scripts/build_posttrain_data.py writes (deterministic); reward pairs are chat
    only (no arithmetic unless --reward-arithmetic), held out by question, and PPO's held-out prompts are
    held-out reward questions that neither the reward model nor PPO trains on."""
    root = Path(__file__).resolve().parents[1]
    data = root / "data" / "posttrain"
    subprocess.run([sys.executable, str(root / "scripts" / "build_posttrain_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("reward.jsonl", "reward_val.jsonl", "ppo_prompts.jsonl", "ppo_eval.jsonl", "dpo.jsonl"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes(), name

    def rows(name: str) -> list[dict]:
        return [json.loads(x) for x in (data / name).read_text(encoding="utf-8").splitlines()]

    train, held = rows("reward.jsonl"), rows("reward_val.jsonl")
    assert not any("<answer>" in r["chosen"] for r in train + held)
    train_q, held_q = {r["prompt"] for r in train}, {r["prompt"] for r in held}
    assert not train_q & held_q and len(held_q) > 200
    ppo_q, eval_q = {r["prompt"] for r in rows("ppo_prompts.jsonl")}, {r["prompt"] for r in rows("ppo_eval.jsonl")}
    assert ppo_q <= train_q and eval_q <= held_q and len(eval_q) == 100
    with_math = tmp_path / "math"
    subprocess.run([sys.executable, str(root / "scripts" / "build_posttrain_data.py"), "--out", str(with_math),
                    "--reward-arithmetic"], check=True, capture_output=True)
    extra = [json.loads(x) for x in (with_math / "reward.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r for r in extra if "<answer>" not in r["chosen"]] == train  # same chat pairs, same order
