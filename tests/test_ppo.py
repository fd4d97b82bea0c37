"""PPO: GAE vs a plain reference loop, each loss term vs the formulas TRL's PPOTrainer documents (re-written
here as scalar loops), KL estimators, whitening, and the objective in the loop (shared / separate critic,
approx-KL early stopping, the value head not saved with the policy, one-line config errors)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from tinylm.posttrain.ppo import (
    explained_variance,
    gae,
    kl_per_token,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from tinylm.train import train
from tinylm.training.trainconfig import load_config

ROOT = Path(__file__).resolve().parents[1]
G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).double()


def test_gae_matches_reference_loop():
    lengths, width, gamma, lam = [5, 2, 7, 1], 7, 0.97, 0.9
    mask = ragged_mask(lengths, width)
    r, v = rand(4, width), rand(4, width)
    adv, ret = gae(r, v, mask, gamma, lam)
    for i, n in enumerate(lengths):  # one episode per row, only its n real tokens, V after the end = 0
        rr, vv = r[i, :n].tolist(), v[i, :n].tolist()
        a = [0.0] * n
        for t in range(n):
            a[t] = sum((gamma * lam) ** (k - t) * (rr[k] + gamma * (vv[k + 1] if k + 1 < n else 0.0) - vv[k])
                       for k in range(t, n))
        assert adv[i, :n].tolist() == pytest.approx(a, abs=1e-12)
        assert ret[i, :n].tolist() == pytest.approx([x + y for x, y in zip(a, vv)], abs=1e-12)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_token_rewards_and_kl_estimators():
    mask = ragged_mask([3, 1], 4)
    lp, ref = -rand(2, 4).abs(), -rand(2, 4).abs()
    k1, k3 = kl_per_token(lp, ref, "k1"), kl_per_token(lp, ref, "k3")
    for i in range(2):
        for t in range(4):
            d = ref[i, t].item() - lp[i, t].item()  # TRL: logr = ref - logprob; k1 = -logr, k3 = (e^logr - 1) - logr
            assert k1[i, t].item() == pytest.approx(-d) and k3[i, t].item() == pytest.approx(math.expm1(d) - d)
    rw = token_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), k1, mask, 0.05)
    want = -0.05 * k1 * mask
    want[0, 2] += 2.0
    want[1, 0] += -1.0
    assert torch.allclose(rw, want)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_per_token(lp, ref, "k2")


def test_masked_whiten_matches_trl():
    x, mask = rand(3, 5), ragged_mask([5, 3, 2], 5)
    vals = [x[i, t].item() for i in range(3) for t in range(5) if mask[i, t]]
    mu, var = statistics.mean(vals), statistics.variance(vals)  # TRL masked_var(unbiased=True)
    w = masked_whiten(x, mask)
    w_keep = masked_whiten(x, mask, shift_mean=False)
    for i in range(3):
        for t in range(5):
            if mask[i, t]:
                assert w[i, t].item() == pytest.approx((x[i, t].item() - mu) / math.sqrt(var + 1e-8), rel=1e-10)
                assert w_keep[i, t].item() == pytest.approx(w[i, t].item() + mu, rel=1e-10)


def _trl_pg(lp, old, adv, mask, eps):
    """TRL PPOTrainer: pg_losses = -A r, pg_losses2 = -A clamp(r, 1-eps, 1+eps), masked mean of the max."""
    num = den = clip = kl = 0.0
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if mask[i][t]:
                ratio = math.exp(lp[i][t] - old[i][t])
                a, b = -adv[i][t] * ratio, -adv[i][t] * min(max(ratio, 1 - eps), 1 + eps)
                num, den, clip = num + max(a, b), den + 1, clip + (b > a)
                kl += 0.5 * (lp[i][t] - old[i][t]) ** 2
    return num / den, clip / den, kl / den


def _trl_vf(v, old_v, ret, mask, eps):
    """TRL PPOTrainer: 0.5 * masked mean of max((v - R)^2, (clamp(v, old - eps, old + eps) - R)^2)."""
    num = den = clip = 0.0
    for i in range(len(v)):
        for t in range(len(v[0])):
            if mask[i][t]:
                vc = min(max(v[i][t], old_v[i][t] - eps), old_v[i][t] + eps)
                l1, l2 = (v[i][t] - ret[i][t]) ** 2, (vc - ret[i][t]) ** 2
                num, den, clip = num + max(l1, l2), den + 1, clip + (l2 > l1)
    return 0.5 * num / den, clip / den


def test_policy_loss_and_gradient_match_trl():
    mask = ragged_mask([6, 4, 1], 6)
    lp = (-rand(3, 6).abs()).requires_grad_()
    old, adv = lp.detach() + 0.3 * rand(3, 6), rand(3, 6)
    loss, stats = policy_loss(lp, old, adv, mask, 0.2)
    want, clipfrac, approx_kl = _trl_pg(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert stats["pg_clipfrac"] == pytest.approx(clipfrac) and 0 < clipfrac < 1
    assert stats["approx_kl"] == pytest.approx(approx_kl)
    loss.backward()
    h = 1e-6
    for i, t in [(0, 0), (0, 5), (1, 2), (2, 0)]:
        up, dn = lp.detach().clone(), lp.detach().clone()
        up[i, t] += h
        dn[i, t] -= h
        f = lambda x: _trl_pg(x.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)[0]  # noqa: E731
        assert lp.grad[i, t].item() == pytest.approx((f(up) - f(dn)) / (2 * h), abs=1e-6)
    assert lp.grad[1, 5].item() == 0  # padding gets no gradient


def test_value_loss_matches_trl():
    mask = ragged_mask([6, 3], 6)
    v, old, ret = rand(2, 6), rand(2, 6), rand(2, 6)
    loss, stats = value_loss(v, old, ret, mask, 0.2)
    want, clipfrac = _trl_vf(v.tolist(), old.tolist(), ret.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(want, rel=1e-10) and stats["vf_clipfrac"] == pytest.approx(clipfrac)
    assert 0 < clipfrac < 1


def test_explained_variance():
    mask = ragged_mask([4, 4], 4)
    ret = rand(2, 4)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret) + 123.0, ret, mask) == pytest.approx(0.0, abs=1e-12)


# -- the objective in the training loop ---------------------------------------------------------------

@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from tinylm.export.interop import init_model

    root = tmp_path_factory.mktemp("ppo")
    init_model("tiny", root / "micro", seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    return root


def run_ppo(root: Path, name: str, *extra: str, objective=None) -> tuple[dict, list[dict]]:
    evals = root / "eval.jsonl"  # 4 held-out prompts keep val_reward cheap
    evals.write_text("".join(x + "\n" for x in (ROOT / "data/posttrain/grpo_eval.jsonl").read_text().splitlines()[:4]))
    over = [f"ppo.eval_prompts={evals}", "max_steps=4", "epochs=0", "batch_size=4", "seq_len=64", "log_every=1", "eval_every=0",
            "save_every=0", "dtype=fp32", "device=cpu", "ppo.reward_model=", "ppo.reward=format,tag_count",
            "ppo.rollout_size=8", "ppo.max_new_tokens=6", "ppo.eval_samples=1", f"model={root / 'micro'}",
            f"out_dir={root / name}", *extra]
    summary = train(load_config(ROOT / "recipes" / "ppo.yaml", over), objective=objective, log=lambda *a: None)
    rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


class Spy:
    """A PPOObjective that remembers its value head / critic weights right after setup."""

    def __new__(cls, *a):
        from tinylm.posttrain.ppo import PPOObjective

        class _Spy(PPOObjective):
            def setup(self, *args):
                super().setup(*args)
                net = self.critic if self.critic is not None else self.net
                self.start = {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}

        return _Spy(None)


def changed(net: torch.nn.Module, start: dict) -> list[str]:
    return [k for k, v in net.named_parameters() if k in start and not torch.equal(v, start[k])]


def test_shared_value_head_is_trained_but_not_saved(micro):
    obj = Spy()
    summary, rows = run_ppo(micro, "shared", "ppo.target_kl=0", objective=obj)
    train_rows = [r for r in rows if "loss" in r]
    keys = {"reward", "kl", "vf_loss", "pg_loss", "pg_clipfrac", "vf_clipfrac", "explained_variance",
            "completion_len", "approx_kl", "entropy"}
    assert keys <= set(train_rows[0]) and [r["step"] for r in rows if "val_reward" in r] == [4]
    assert train_rows[0]["kl"] == pytest.approx(0, abs=1e-6)  # first rollout: policy == reference
    assert obj.critic is None and "v_head.weight" in changed(obj.net, obj.start)
    from safetensors import safe_open

    with safe_open(str(Path(summary["final"]) / "model.safetensors"), "pt") as f:
        assert not any("v_head" in k for k in f.keys())


def test_separate_critic_is_updated(micro):
    obj = Spy()
    run_ppo(micro, "separate", "ppo.value_model=separate", objective=obj)
    moved = changed(obj.critic, obj.start)
    assert "v_head.weight" in moved and any(k.startswith("model.") for k in moved)
    assert not hasattr(obj.net, "v_head")


def test_approx_kl_early_stop_starts_a_new_rollout(micro):
    _, rows = run_ppo(micro, "early", "ppo.target_kl=1e-12", "lr=0.05", "max_steps=3", "ppo.epochs=4")
    early = [r["early_stop"] for r in rows if "loss" in r]
    assert early[0] == 0 and sum(early[1:]) >= 1  # the second minibatch already moved the policy too far


@pytest.mark.parametrize("extra,msg", [
    (["ppo.reward_model=x", "ppo.reward=format"], "set exactly one of ppo.reward_model"),
    (["ppo.rollout_size=6"], r"ppo.rollout_size \(6\) must be a positive multiple of batch_size \(4"),
    (["ppo.value_model=both"], "ppo.value_model='both' is not one of shared, separate"),
])
def test_config_errors(micro, extra, msg):
    with pytest.raises(ValueError, match=msg):
        run_ppo(micro, "bad", *extra)


def test_reward_model_without_head_is_refused(micro):
    with pytest.raises(ValueError, match=r"micro: no reward score head \(score.weight"):
        run_ppo(micro, "bad_rm", "ppo.reward=", f"ppo.reward_model={micro / 'micro'}")
