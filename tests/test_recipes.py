"""Every shipped recipe runs end to end through `tinylm.train.train`, chained as the docs chain them.

    pretrain -> sft, lora_identity, qlora          reason -> dpo, grpo, distill (teacher)

Each recipe is loaded from recipes/ exactly as shipped, then shrunk by overrides only: a micro model
(a saved `tiny` init with 1 layer of width 32, the bundled tokenizer), 2 steps, tiny batches and a
tmp out_dir; the bundled data files are the recipes' own. What a recipe sets beyond that (stage,
LoRA/QLoRA, DPO loss, GRPO rewards and held-out prompts, the teacher) is what runs. Also: the
DPO / GRPO reference paths (frozen copy, adapters off, ref_model=DIR), LoRA on a preset refused,
the QLoRA start line, and `tinylm report` plotting the post-training metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tinylm.train import train
from tinylm.training.trainconfig import load_config

ROOT = Path(__file__).resolve().parents[1]
SHRINK = ["max_steps=2", "epochs=0", "batch_size=2", "grad_accum=1", "seq_len=64", "warmup_steps=1",
          "log_every=1", "eval_every=0", "eval_batches=1", "save_every=0", "sample_every=0", "sample_prompts=[]",
          "dtype=fp32", "device=cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories shared by the chained recipes (built on first use)."""
    from tinylm.export.interop import init_model

    root = tmp_path_factory.mktemp("recipes")
    init_model("tiny", root / "micro", seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    return {"root": root, "micro": root / "micro"}


def run_recipe(runs: dict, recipe: str, name: str, *overrides: str, objective=None) -> tuple[dict, list[str]]:
    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml", [*SHRINK, f"out_dir={runs['root'] / name}", *overrides])
    lines: list[str] = []
    summary = train(cfg, objective=objective, log=lines.append)
    assert summary["step"] == 2 and math.isfinite(summary["loss"]), (recipe, summary)
    assert (Path(summary["final"]) / "tokenizer.json").exists()
    runs[name] = Path(summary["final"])
    return summary, lines


def need(runs: dict, name: str) -> Path:
    """The final/ of an upstream run, running it first when this test runs alone."""
    if name not in runs:
        upstream = {"pretrain": ("pretrain", f"model={runs['micro']}"),
                    "reason": ("reason", f"model={runs['micro']}")}[name]
        run_recipe(runs, upstream[0], name, upstream[1])
    return runs[name]


def metrics(final: Path) -> list[dict]:
    return [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_recipe(runs):
    run_recipe(runs, "pretrain", "pretrain", f"model={runs['micro']}")
    assert (runs["pretrain"] / "model.safetensors").exists()


def test_sft_recipe(runs):
    _, lines = run_recipe(runs, "sft", "sft", f"model={need(runs, 'pretrain')}")
    assert any("val_loss" in x for x in lines)  # recipe has data.val


@pytest.mark.parametrize("recipe", ["lora_identity", "qlora"])
def test_lora_recipes(runs, recipe):
    _, lines = run_recipe(runs, recipe, recipe, f"model={need(runs, 'pretrain')}")
    final = runs[recipe]
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(runs["pretrain"]) and not (final / "config.json").exists()
    start = lines[0]
    assert "trainable /" in start and ("NF4 weights" in start) == (recipe == "qlora"), start


def test_lora_on_a_preset_is_refused(runs):
    with pytest.raises(ValueError, match="saved base model directory"):
        run_recipe(runs, "lora_identity", "lora_preset", "model=tiny")


def test_reason_recipe(runs):
    run_recipe(runs, "reason", "reason", f"model={runs['micro']}")


@pytest.mark.parametrize("variant", ["copy", "lora_adapters_off", "ref_model_dir"])
def test_dpo_recipe_and_reference_paths(runs, variant):
    from tinylm.posttrain.dpo import DPOObjective

    extra = {"copy": [], "lora_adapters_off": ["lora.enabled=true", "lora.r=4"],
             "ref_model_dir": [f"dpo.ref_model={runs['micro']}"]}[variant]
    obj = DPOObjective(None)
    _, lines = run_recipe(runs, "dpo", f"dpo_{variant}", f"model={need(runs, 'reason')}", *extra, objective=obj)
    ref = obj.ref
    assert (ref.adapter_ctx is not None) == (variant == "lora_adapters_off")
    assert (ref.model is not None) == (variant != "lora_adapters_off")
    rows = [r for r in metrics(runs[f"dpo_{variant}"]) if "loss" in r]
    if variant == "ref_model_dir":  # another reference: the start policy already has a non-zero margin
        assert abs(rows[0]["rewards/margins"]) > 1e-4
    else:  # reference == start policy: loss log 2, margin 0 at the first step
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert "| margin " in lines[1] and "| acc " in lines[1]


@pytest.mark.parametrize("variant", ["recipe", "kl_lora_adapters_off", "kl_ref_model_dir"])
def test_grpo_recipe_and_reference_paths(runs, variant):
    from tinylm.posttrain.grpo import GRPOObjective

    extra = {"recipe": [], "kl_lora_adapters_off": ["grpo.beta=0.1", "lora.enabled=true", "lora.r=4"],
             "kl_ref_model_dir": ["grpo.beta=0.1", f"grpo.ref_model={runs['micro']}"]}[variant]
    small = ["batch_size=8", "grpo.max_new_tokens=8", "grpo.eval_samples=1"]
    obj = GRPOObjective(None)
    _, lines = run_recipe(runs, "grpo", f"grpo_{variant}", f"model={need(runs, 'reason')}", *small, *extra,
                          objective=obj)
    rows = metrics(runs[f"grpo_{variant}"])
    train_rows = [r for r in rows if "loss" in r]
    assert all(r["tokens_per_s"] > 0 for r in train_rows) and "| reward " in lines[1]
    assert [r["step"] for r in rows if "val_reward" in r] == [2]  # the recipe's held-out prompts
    if variant == "recipe":
        assert obj.ref is None
    else:
        assert (obj.ref.model is None) == (variant == "kl_lora_adapters_off")
        assert all("kl" in r for r in train_rows)


def test_distill_recipe(runs):
    run_recipe(runs, "distill", "distill", f"model={runs['micro']}", f"distill.teacher={need(runs, 'reason')}")
    assert {"ce", "kl"} <= set(metrics(runs["distill"])[0])


def test_report_plots_post_training_metrics(runs, tmp_path):
    from tinylm.evaluation.report import write_report

    need(runs, "reason")
    for name, extra in (("dpo_copy", []), ("grpo_recipe", ["batch_size=8", "grpo.max_new_tokens=8",
                                                            "grpo.eval_samples=1"])):
        if name not in runs:
            run_recipe(runs, name.split("_")[0], name, f"model={runs['reason']}", *extra)
    write_report(runs["dpo_copy"].parent, tmp_path / "dpo")
    write_report(runs["grpo_recipe"].parent, tmp_path / "grpo")
    assert {"dpo_margins.png", "dpo_accuracy.png"} <= {p.name for p in (tmp_path / "dpo" / "plots").iterdir()}
    assert "reward.png" in {p.name for p in (tmp_path / "grpo" / "plots").iterdir()}
    assert "![reward](plots/reward.png)" in (tmp_path / "grpo" / "report.md").read_text()


def test_reward_recipe(runs):
    from tinylm.posttrain.reward import read_score_head

    _, lines = run_recipe(runs, "reward", "reward", f"model={need(runs, 'reason')}")
    assert any("val_accuracy" in x and "val_length_baseline_accuracy" in x for x in lines)
    assert read_score_head(runs["reward"]).shape == (1, 32)


PPO_SMALL = ["batch_size=4", "ppo.rollout_size=8", "ppo.max_new_tokens=8", "ppo.eval_samples=1"]


@pytest.mark.parametrize("variant", ["reward_model", "rules"])
def test_ppo_recipe_with_both_reward_sources(runs, variant):
    if "reward" not in runs:
        test_reward_recipe(runs)
    # recipes/ppo.yaml: the reward model on chat prompts; recipes/ppo_rules.yaml: rule rewards on arithmetic
    recipe, source = ("ppo", [f"ppo.reward_model={runs['reward']}"]) if variant == "reward_model" else ("ppo_rules", [])
    _, lines = run_recipe(runs, recipe, f"ppo_{variant}", f"model={need(runs, 'reason')}", *PPO_SMALL, *source)
    rows = metrics(runs[f"ppo_{variant}"])
    assert "| reward " in lines[1] and "| kl " in lines[1]
    assert [r["step"] for r in rows if "val_reward" in r] == [2]  # the recipe's held-out prompts
    fn = "reward_model" if variant == "reward_model" else "accuracy_reward"
    assert any(f"val_rewards/{fn}" in r for r in rows)


def test_report_plots_reward_model_and_ppo_metrics(runs, tmp_path):
    from tinylm.evaluation.report import write_report

    if "ppo_rules" not in runs:
        test_ppo_recipe_with_both_reward_sources(runs, "rules")
    write_report(runs["reward"].parent, tmp_path / "rm")
    write_report(runs["ppo_rules"].parent, tmp_path / "ppo")
    assert "rm_accuracy.png" in {p.name for p in (tmp_path / "rm" / "plots").iterdir()}
    assert {"reward.png", "kl.png", "ppo_losses.png", "ppo_clipfrac.png", "explained_variance.png",
            "completion_len.png"} <= {p.name for p in (tmp_path / "ppo" / "plots").iterdir()}


def test_tool_recipes_chain(runs, capsys):
    """recipes/tool_sft(_smollm2).yaml -> agent_rl(_smollm2).yaml on the micro model: tool rows through the
    tool template, then GRPO with tools in the rollout (LoRA on a LoRA run's merged output for SmolLM2)."""
    run_recipe(runs, "tool_sft", "tool_sft", f"model={runs['micro']}", "seq_len=448")  # rows are ~340 tokens
    rl = ["grpo.group_size=2", "grpo.max_new_tokens=8", "grpo.max_turns=1", "seq_len=448"]
    run_recipe(runs, "agent_rl", "agent_rl", f"model={runs['tool_sft']}", *rl)
    run_recipe(runs, "tool_sft_smollm2", "tool_sft_lora", f"model={runs['micro']}", "seq_len=448")
    assert (runs["tool_sft_lora"] / "adapter_config.json").exists()
    _, lines = run_recipe(runs, "agent_rl_smollm2", "agent_rl_lora", f"model={runs['tool_sft_lora']}", *rl)
    assert "trainable /" in lines[0]
    assert any("reward" in row for row in metrics(runs["agent_rl_lora"]))
    from tinylm.models.loading import load_model

    capsys.readouterr()
    load_model(str(runs["agent_rl_lora"]))  # RL adapter on (base + merged SFT adapter): that is its base
    assert "warning" not in capsys.readouterr().err
