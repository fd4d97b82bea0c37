"""GRPO advantages and clipped loss vs TRL's GRPOTrainer formulas (re-written here), rewards."""

import math
import statistics

import pytest
import torch

from tinylm.posttrain.grpo import group_advantages, grpo_loss
from tinylm.posttrain.rewards import (
    accuracy_reward,
    extract_answer,
    format_reward,
    resolve_reward,
    tag_count_reward,
)


def test_group_advantages_match_trl():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.5, 3.0, 0.0])
    adv = group_advantages(r, 4, "group")
    for gi in range(3):
        grp = r[gi * 4:(gi + 1) * 4].tolist()
        mu, sd = statistics.mean(grp), statistics.stdev(grp)  # TRL nanstd = Bessel-corrected
        for j in range(4):
            assert adv[gi * 4 + j].item() == pytest.approx((grp[j] - mu) / (sd + 1e-4), abs=1e-6)
    assert torch.all(group_advantages(r, 4, "none").view(3, 4).sum(1).abs() < 1e-6)
    b = group_advantages(r, 4, "batch")
    assert b[0].item() == pytest.approx((1.0 - statistics.mean(r[:4].tolist())) / (statistics.stdev(r.tolist()) + 1e-4),
                                        abs=1e-6)
    with pytest.raises(ValueError):
        group_advantages(r, 5)


def _trl_loss(lp, old, ref, adv, mask, beta, eps_lo, eps_hi, loss_type):
    """TRL GRPOTrainer._compute_loss, token-level importance sampling, scalar loops."""
    B, T = len(lp), len(lp[0])
    per_tok = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            ratio = math.exp(lp[i][t] - old[i][t])
            c = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
            v = -min(ratio * adv[i], c * adv[i])
            if beta:
                d = ref[i][t] - lp[i][t]
                v += beta * (math.exp(d) - d - 1)
            per_tok[i][t] = v
    if loss_type == "grpo":
        return sum(sum(per_tok[i][t] * mask[i][t] for t in range(T)) / max(sum(mask[i]), 1) for i in range(B)) / B
    return sum(per_tok[i][t] * mask[i][t] for i in range(B) for t in range(T)) / max(sum(map(sum, mask)), 1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
@pytest.mark.parametrize("beta,eps_hi", [(0.0, None), (0.04, None), (0.1, 0.28)])
def test_loss_and_grad_match_trl(loss_type, beta, eps_hi):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = lp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # off-policy: clipping active
    ref = lp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    loss_sum, n, m = grpo_loss(lp, old, adv, mask, ref_logps=ref, beta=beta, epsilon=0.2, epsilon_high=eps_hi,
                               loss_type=loss_type)
    want = _trl_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, 0.2,
                     eps_hi if eps_hi is not None else 0.2, loss_type)
    assert (loss_sum / n).item() == pytest.approx(want, rel=1e-10)
    assert m["clip_ratio"] > 0
    (loss_sum / n).backward()
    h = 1e-6
    for i, t in [(0, 0), (0, 6), (1, 3), (2, 1), (3, 6)]:
        up, dn = lp.detach().clone(), lp.detach().clone()
        up[i, t] += h
        dn[i, t] -= h
        f = lambda x: _trl_loss(x.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),  # noqa: E731
                                beta, 0.2, eps_hi if eps_hi is not None else 0.2, loss_type)
        assert lp.grad[i, t].item() == pytest.approx((f(up) - f(dn)) / (2 * h), abs=1e-6)


def test_on_policy_gradient_is_advantage_weighted():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    loss_sum, n, _ = grpo_loss(lp, lp.detach(), adv, torch.ones(2, 2), loss_type="dapo")
    (loss_sum / n).backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -1.0], [2.0, 2.0]]) / 4)


def test_rewards():
    good = "<think>\n2 + 3 = 5\n</think>\n<answer>\n5\n</answer>"
    bad_order = "<answer>5</answer><think>x</think>"
    assert format_reward([], [good, bad_order, "5", "<think></think><answer>5</answer>"]) == [1.0, 0, 0, 0]
    assert tag_count_reward([], [good, "<think> hi", ""]) == [1.0, 0.25, 0.0]
    assert extract_answer(good) == "5"
    assert extract_answer("<think>1,234 + 1</think><answer>1,235.</answer>") == "1235"
    assert accuracy_reward([""] * 3, [good, "<answer>6</answer>", "no"], answer=[5, 5, 5]) == [1.0, 0.0, 0.0]
    assert resolve_reward("accuracy") is accuracy_reward
    assert resolve_reward("tinylm.posttrain.rewards:format_reward") is format_reward
    with pytest.raises(ValueError, match="unknown reward"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="needs an 'answer'"):
        accuracy_reward([""], [good])


def _micro(vocab, seed=0, init=0.02):
    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM

    torch.manual_seed(seed)
    return TinyLMForCausalLM(TinyLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, eos_token_id=[2, 0],
                                          initializer_range=init)).eval()


def test_static_cache_sampling_matches_hf_generate_and_logps():
    from tinylm.posttrain.grpo import completion_logps, sample

    model = _micro(50, init=0.5)  # large init: diverse greedy outputs
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 20, 30, 40, 41]]
    outs = sample(model, prompts, 10, temperature=0, eos_ids=(2,))
    for p, c in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(p):].tolist()
        assert c == ref[:len(c)] and (len(c) == 10 or c[-1] == 2)
    assert len({tuple(c) for c in outs}) > 1
    logps, mask = completion_logps(lambda i, a: model(i, attention_mask=a).logits, prompts, outs,
                                   torch.device("cpu"))
    for b, (p, c) in enumerate(zip(prompts, outs)):
        full = torch.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
        want = [full[len(p) + j - 1, t].item() for j, t in enumerate(c)]
        assert logps[b, :len(c)].tolist() == pytest.approx(want, abs=1e-4)
        assert mask[b].sum().item() == len(c)


def test_grpo_objective_step(tmp_path):
    import json

    from tinylm.posttrain.grpo import GRPOObjective
    from tinylm.text.tokenizer import load_tokenizer
    from tinylm.training.trainconfig import TrainConfig

    tok = load_tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                            for a in range(6)))
    cfg = TrainConfig(stage="grpo", batch_size=8)
    cfg.data.train = str(path)
    cfg.grpo.group_size, cfg.grpo.max_new_tokens, cfg.grpo.beta = 4, 8, 0.05
    cfg.grpo.reward = "format,tag_count,tinylm.posttrain.rewards:accuracy_reward"
    model = _micro(len(tok)).train()
    obj = GRPOObjective(cfg)
    obj.setup(model, tok, cfg, torch.device("cpu"))
    batch = next(obj.batches("train"))
    assert len(batch["rows"]) == 2
    loss_sum, n, m = obj.loss(model, batch)
    loss_sum.backward()
    assert n == m["completion_len"] * 8 and m["kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"reward", "rewards/format_reward", "rewards/accuracy_reward", "clip_ratio"} <= set(m)
    assert any(p.grad is not None for p in model.parameters())
    cfg.batch_size = 6
    with pytest.raises(ValueError, match="multiple of grpo.group_size"):
        GRPOObjective(cfg).setup(model, tok, cfg, torch.device("cpu"))


# -- learning, held-out reward, reference paths (scripted micro setup: a 20-word tokenizer) -------------

def letter_a_reward(prompts, completions, **kw):
    """Scripted reward: the number of words 'a' in the completion / 6 (loaded as "test_grpo:letter_a_reward")."""
    return [t.split().count("a") / 6 for t in completions]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "user", "assistant"] + list("abcdefghijklmnop")
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
                         "{% if add_generation_prompt %}assistant {% endif %}")
    return tok


def _word_model(tok, seed=0):
    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM

    torch.manual_seed(seed)
    return TinyLMForCausalLM(TinyLMConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          eos_token_id=1, pad_token_id=0))


def _prompt_file(path, prompts):
    import json

    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def test_grpo_training_raises_held_out_reward(tmp_path):
    """GRPO through `tinylm train`: mean reward rises on the training prompts AND on held-out prompts
    (`grpo.eval_prompts` -> val_reward rows), tokens/s counts the sampled tokens, the console shows reward."""
    import json

    from tinylm.posttrain.grpo import evaluate_rewards
    from tinylm.train import train
    from tinylm.training.trainconfig import load_config

    tok = _word_tokenizer()
    base = _word_model(tok)
    base.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    train_p = _prompt_file(tmp_path / "train.jsonl", ["b c", "d e f", "g", "h i", "j k l", "m", "n o", "p b"])
    held = ["c d", "e", "f g h", "i j"]
    eval_p = _prompt_file(tmp_path / "eval.jsonl", held)
    before = evaluate_rewards(base, tok, [{"prompt": p} for p in held], [letter_a_reward], 4, 6, seed=3)["reward"]
    cfg = load_config(None, [
        "stage=grpo", f"model={tmp_path / 'base'}", f"data.train={train_p}", f"out_dir={tmp_path / 'run'}",
        "batch_size=16", "max_steps=8", "lr=3e-2", "warmup_steps=0", "min_lr=3e-2", "weight_decay=0",
        "log_every=1", "eval_every=4", "save_every=0", "dtype=fp32", "device=cpu", "seed=3",
        "grpo.group_size=4", "grpo.max_new_tokens=6", "grpo.reward=test_grpo:letter_a_reward",
        "grpo.reward_weights=[2.0]", f"grpo.eval_prompts={eval_p}", "grpo.eval_samples=4"])
    lines = []
    train(cfg, log=lines.append)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    vals = [r for r in rows if "val_reward" in r]
    assert [r["step"] for r in vals] == [4, 8]
    assert steps[0]["reward"] < 0.5 and steps[-1]["reward"] > 1.5, [r["reward"] for r in steps]  # max 2 (weight 2)
    assert steps[-1]["reward"] == pytest.approx(2 * steps[-1]["rewards/letter_a_reward"])
    assert vals[-1]["val_reward"] == pytest.approx(2 * vals[-1]["val_rewards/letter_a_reward"])
    assert vals[-1]["val_reward"] > 2 * before + 1.0, (before, vals)  # held-out prompts improve too
    assert all(r["tokens_per_s"] > 0 for r in steps) and steps[-1]["tokens_seen"] > 8 * 16 * 5
    assert any("| reward " in x and "reward_std" in x for x in lines)
    assert any("val_reward" in x for x in lines)


def test_grpo_reward_weights_must_match_functions(tmp_path):
    from tinylm.posttrain.grpo import GRPOObjective
    from tinylm.training.trainconfig import TrainConfig

    tok = _word_tokenizer()
    cfg = TrainConfig(stage="grpo", batch_size=8)
    cfg.data.train = str(_prompt_file(tmp_path / "p.jsonl", ["b"]))
    cfg.grpo.reward, cfg.grpo.reward_weights = "format,accuracy", [1.0]
    with pytest.raises(ValueError, match="2 reward functions"):
        GRPOObjective(cfg).setup(_word_model(tok), tok, cfg, torch.device("cpu"))


def test_grpo_kl_reference_adapters_off_and_ref_model_dir(tmp_path):
    """beta > 0: the k3 KL is taken against the base with LoRA adapters off (no copy), or grpo.ref_model=DIR."""
    from tinylm.models.lora import apply_lora, lora_modules
    from tinylm.posttrain.grpo import GRPOObjective, completion_logps, grpo_loss
    from tinylm.training.trainconfig import TrainConfig

    tok = _word_tokenizer()
    other = _word_model(tok, seed=7)
    other.save_pretrained(str(tmp_path / "other"))
    tok.save_pretrained(str(tmp_path / "other"))
    for ref_dir in ("", str(tmp_path / "other")):
        base_copy = _word_model(tok) if not ref_dir else _word_model(tok, seed=7)
        policy = apply_lora(_word_model(tok), r=4, alpha=8)
        with torch.no_grad():
            for _, layer in lora_modules(policy):
                layer.lora_B.weight.normal_(0, 0.3)
        cfg = TrainConfig(stage="grpo", batch_size=8)
        cfg.data.train = str(_prompt_file(tmp_path / "p.jsonl", ["b c", "d"]))
        cfg.grpo.max_new_tokens, cfg.grpo.beta, cfg.grpo.ref_model = 5, 0.1, ref_dir
        cfg.grpo.reward = "test_grpo:letter_a_reward"
        obj = GRPOObjective(cfg)
        obj.setup(policy, tok, cfg, torch.device("cpu"))
        assert (obj.ref.model is None) == (not ref_dir)  # adapters off: no second model in memory
        prompts, comps = [[2, 5, 6, 1, 3], [2, 7, 1, 3]], [[4, 4, 9], [10, 1]]
        logits_fn = lambda m: (lambda i, a: m(i, attention_mask=a).logits)  # noqa: E731
        with torch.no_grad():
            want, mask = completion_logps(logits_fn(base_copy), prompts, comps, torch.device("cpu"))
            got, _ = completion_logps(obj.ref, prompts, comps, torch.device("cpu"))
            lp, _ = completion_logps(logits_fn(policy), prompts, comps, torch.device("cpu"))
        torch.testing.assert_close(got, want)
        assert not torch.allclose(lp, want, atol=1e-3)
        _, _, m = grpo_loss(lp, lp, torch.zeros(2), mask, got, beta=0.1)
        assert m["kl"] > 1e-4
