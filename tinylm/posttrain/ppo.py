"""PPO with a value function for language models: classic RLHF (stage `ppo`).

The recipe of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and
InstructGPT (Ouyang et al. 2022), with the loss terms written as TRL's PPOTrainer documents them:

  rollout   sample one completion per prompt (the same sampler / packing code as GRPO, tinylm/posttrain/grpo.py);
            score it once: a reward model (tinylm/posttrain/reward.py) or GRPO's rule rewards (tinylm/posttrain/rewards.py).
  rewards   per token t:  r_t = -kl_coef * kl_t   (+ the score on the last completion token)
            kl_t = logp_t - logp_ref_t  (k1)   or  (ratio - 1) - log ratio, ratio = p_ref / p  (k3)
            (the KL penalty keeps the policy near the frozen reference: Jaques et al. 2017, Ziegler 2019)
  GAE       delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1}   (Schulman et al. 2015)
            returns = A + V;  advantages whitened over the rollout's tokens
  update    `ppo.epochs` passes over the rollout in shuffled minibatches of `batch_size` completions;
            each minibatch is one step of the training loop (Schulman et al. 2017):
              pg_loss = mean_t max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
              vf_loss = 0.5 mean_t max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)
              loss    = pg_loss + vf_coef * vf_loss          (shared trunk)
            approx_kl = 0.5 mean (logp - logp_old)^2; above `ppo.target_kl` the remaining minibatches
            of this rollout are dropped and a new rollout starts (early stopping, as OpenAI baselines).

Value function, `ppo.value_model`:
  "shared"    a linear value head on the policy's last hidden state (one forward for both; the value
              loss also shapes the trunk). The head is not written to the saved policy.
  "separate"  a critic network (a copy of the start policy or `ppo.critic_model`, e.g. the reward model,
              as InstructGPT) with its own head and AdamW (`ppo.critic_lr`), updated inside the objective
              on the same minibatches: twice the memory, no interference with the policy.

Loop integration: the loop's batches are placeholders; the objective keeps its own prompt iterator
(resumable through the placeholder iterator's state_dict) and a rollout buffer. Single process.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from tinylm.posttrain.grpo import gather_completion_logps, pack_completions

# -- the formulas -------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of the masked entries, as TRL's masked_var."""
    n = mask.sum()
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries; shift_mean=False keeps the mean."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    return out if shift_mean else out + mean


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """(B, C) per-token KL estimate of the sampled tokens (Schulman 2020, "Approximating KL divergence")."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        logr = ref_logps - logps
        return torch.exp(logr) - 1 - logr
    raise ValueError(f"config: ppo.kl_estimator={estimator!r} is not one of k1, k3")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """scores (B,), kl (B, C), mask (B, C) -> (B, C): -kl_coef * kl, plus the score on the last real token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)                            # (B,)
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded (B, C) rows -> (advantages, returns), 0 on padding.

    V after the last real token is 0 (the episode ends there), which the masked values give for free.
    """
    values = values * mask
    rewards = rewards * mask
    last = torch.zeros_like(values[:, 0])
    adv = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        next_v = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (all (B, C)): masked mean of max(-A r, -A clip(r)). Returns (loss, stats)."""
    diff = logps - old_logps
    ratio = torch.exp(diff)
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(l1, l2), mask)
    stats = {"pg_clipfrac": masked_mean((l2 > l1).float(), mask).item(),
             "approx_kl": (0.5 * masked_mean(diff.detach() ** 2, mask)).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (all (B, C)): 0.5 masked mean of max((V - R)^2, (clip(V) - R)^2)."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    l1 = (values - returns) ** 2
    l2 = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask)
    return loss, {"vf_clipfrac": masked_mean((l2 > l1).float(), mask).item()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens (1 = perfect critic, <= 0 = no better than a constant)."""
    var_r = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_r) if var_r > 0 else float("nan")


# -- forward passes -----------------------------------------------------------------------------------

def logps_and_values(policy: torch.nn.Module, critic: torch.nn.Module | None, prompt_ids: list[list[int]],
                     comps: list[list[int]], temperature: float, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, C), values (B, C), mask (B, C) and entropy (B, C) of packed completions.

    critic None: the value head `policy.v_head` on the policy's trunk (one forward)."""
    from tinylm.posttrain.reward import trunk_hidden

    ids, attn, tgt_pos, mask = pack_completions(prompt_ids, comps, device)
    h = trunk_hidden(policy, ids, attn)                                      # (B, T, H)
    pos = (tgt_pos - 1).clamp(min=0)                                         # (B, C): state before each token
    hp = h.gather(1, pos[:, :, None].expand(-1, -1, h.size(-1)))             # (B, C, H)
    logits = policy.get_output_embeddings()(hp).float() / max(temperature, 1e-7)  # (B, C, V)
    logp_all = torch.log_softmax(logits, -1)
    tok = ids.gather(1, tgt_pos)
    logps = logp_all.gather(2, tok[:, :, None]).squeeze(-1) * mask          # (B, C)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach() * mask
    if critic is None:
        vh = hp
        head = policy.v_head
    else:
        vh = trunk_hidden(critic, ids, attn).gather(1, pos[:, :, None].expand(-1, -1, h.size(-1)))
        head = critic.v_head
    values = head(vh.to(head.weight.dtype)).squeeze(-1).float() * mask      # (B, C)
    return logps, values, mask, entropy


@torch.no_grad()
def ref_completion_logps(ref: Any, prompt_ids: list[list[int]], comps: list[list[int]], temperature: float,
                         device: torch.device) -> torch.Tensor:
    ids, attn, tgt_pos, mask = pack_completions(prompt_ids, comps, device)
    return gather_completion_logps(ref(ids, attn).float() / max(temperature, 1e-7), ids, tgt_pos, mask)


# -- objective ----------------------------------------------------------------------------------------

class _Placeholders:
    """The loop's batch iterator: empty batches; position = the objective's prompt iterator (resumable)."""

    def __init__(self, objective: PPOObjective, steps_per_epoch: int) -> None:
        self.obj, self.n = objective, steps_per_epoch

    def __iter__(self) -> _Placeholders:
        return self

    def __next__(self) -> dict[str, Any]:
        return {"n_tokens": 0}

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict:
        return self.obj.prompts.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.obj.prompts.load_state_dict(state)


class PPOObjective:
    """Stage `ppo`: each loss() call is one PPO minibatch update; rollouts are made when the buffer is empty."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def setup(self, model: torch.nn.Module, tokenizer: Any, cfg: Any, device: torch.device) -> None:
        from tinylm.posttrain.dpo import ReferenceModel, RowIterator
        from tinylm.posttrain.grpo import load_prompts

        p = cfg.ppo
        check_config(cfg)
        self.cfg, self.tokenizer, self.device, self.net = cfg, tokenizer, device, model
        self.reward_fns, self.weights = reward_source(cfg, tokenizer, device)
        self.ref = ReferenceModel(model, cfg, device, path=p.ref_model)
        rows = load_prompts(cfg.data.train)
        self.prompts = RowIterator(rows, p.rollout_size, lambda r: r, 0, 1, cfg.seed)
        self.n_mb = p.rollout_size // cfg.batch_size
        self.steps_per_epoch = math.ceil(len(rows) / p.rollout_size) * p.epochs * self.n_mb
        self.eval_rows = load_prompts(p.eval_prompts) if p.eval_prompts else None
        self.critic, self.critic_opt = self._value_model(model, tokenizer, device)
        self.sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.buffer: dict[str, Any] | None = None
        self.schedule: list[list[int]] = []

    def _value_model(self, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> tuple[Any, Any]:
        from tinylm.posttrain.reward import add_score_head, read_score_head

        p, pad = self.cfg.ppo, tokenizer.pad_token_id or 0
        torch.manual_seed(self.cfg.seed)
        if p.value_model == "shared":
            add_score_head(model, pad, name="v_head")
            model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | {"v_head.weight"}
            return None, None
        if p.critic_model:
            from tinylm.models.loading import load_model

            critic = load_model(p.critic_model, dtype="fp32", device=device)[0]
        else:
            critic = copy.deepcopy(model)
        critic.train()
        head = add_score_head(critic, pad, name="v_head")
        if p.critic_model and (score := read_score_head(p.critic_model)) is not None:
            head.weight.data.copy_(score)  # a reward model's head: InstructGPT's value initialisation
        params = [q for q in critic.parameters() if q.requires_grad]
        return critic, torch.optim.AdamW(params, lr=p.critic_lr, weight_decay=0.0)

    def batches(self, split: str, rank: int = 0, world_size: int = 1) -> Any:
        return _Placeholders(self, self.steps_per_epoch) if split == "train" else iter(())

    def sample_ids(self, text: str) -> list[int]:
        from tinylm.text.chat_format import render_prompt

        return list(render_prompt(self.tokenizer, [{"role": "user", "content": text}]))

    @torch.no_grad()
    def make_rollout(self) -> dict[str, Any]:
        """Sample, score, and compute old log-probs, values, KL-shaped rewards, advantages and returns."""
        from tinylm.posttrain.grpo import rollout, score

        p = self.cfg.ppo
        rows = next(self.prompts)
        prompt_ids, comps, texts = rollout(self.net, self.tokenizer, rows, 1, p.max_new_tokens, p.temperature,
                                           self.sample_gen)
        scores = (score(rows, texts, self.reward_fns, 1) * self.weights).sum(1).to(self.device)  # (N,)
        was = self.net.training
        self.net.eval()
        parts = [logps_and_values(self.net, self.critic, prompt_ids[i:i + self.cfg.batch_size],
                                  comps[i:i + self.cfg.batch_size], p.temperature, self.device)
                 for i in range(0, len(comps), self.cfg.batch_size)]
        self.net.train(was)
        c = max(max(len(x) for x in comps), 1)
        pad = lambda t: torch.nn.functional.pad(t, (0, c - t.size(1)))  # noqa: E731
        logps, values, mask = (torch.cat([pad(part[k]) for part in parts]) for k in range(3))  # (N, C)
        ref = ref_completion_logps(self.ref, prompt_ids, comps, p.temperature, self.device)
        kl = kl_per_token(logps, ref, p.kl_estimator) * mask
        rewards = token_rewards(scores, kl, mask, p.kl_coef)
        if p.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
        adv = masked_whiten(adv, mask) * mask
        stats = {"reward": scores.mean().item(), "kl": kl.sum(1).mean().item(),
                 "rlhf_reward": (scores - p.kl_coef * kl.sum(1)).mean().item(),
                 "completion_len": mask.sum(1).mean().item(),
                 "explained_variance": explained_variance(values, returns, mask)}
        g = torch.Generator().manual_seed(self.cfg.seed + self.prompts.epoch * 7919 + self.prompts.position)
        n, b = len(comps), self.cfg.batch_size
        self.schedule = [perm[i:i + b] for _ in range(p.epochs) for perm in [torch.randperm(n, generator=g).tolist()]
                         for i in range(0, n, b)]
        return {"prompt_ids": prompt_ids, "comps": comps, "logps": logps, "values": values, "adv": adv,
                "returns": returns, "stats": stats, "updates": 0}

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        if self.buffer is None or not self.schedule:
            self.buffer = self.make_rollout()
        out = self._minibatch_losses(self.schedule[0])
        early = 0.0
        if self.cfg.ppo.target_kl and self.buffer["updates"] > 0 and out[2]["approx_kl"] > self.cfg.ppo.target_kl:
            early, self.buffer = 1.0, self.make_rollout()   # early stop: drop the rest of this rollout
            out = self._minibatch_losses(self.schedule[0])
        self.schedule.pop(0)
        self.buffer["updates"] += 1
        pg, vf, stats, idx = out
        buf = self.buffer
        batch["sampled_tokens"] = sum(len(buf["prompt_ids"][i]) + len(buf["comps"][i]) for i in idx)
        vf_coef = self.cfg.ppo.vf_coef
        if self.critic is not None:             # separate critic: its own step, the loop sees the policy loss
            self.critic_opt.zero_grad(set_to_none=True)
            (vf_coef * vf).backward()
            torch.nn.utils.clip_grad_norm_(self.critic_opt.param_groups[0]["params"], self.cfg.grad_clip or 1e9)
            self.critic_opt.step()
            loss = pg
        else:
            loss = pg + vf_coef * vf
        stats.update(buf["stats"])
        stats.update({"pg_loss": pg.item(), "vf_loss": vf.item(), "early_stop": early})
        return loss, 1, stats

    def _minibatch_losses(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], list[int]]:
        p, buf = self.cfg.ppo, self.buffer
        logps, values, mask, entropy = logps_and_values(
            self.net, self.critic, [buf["prompt_ids"][i] for i in idx], [buf["comps"][i] for i in idx],
            p.temperature, self.device)
        c = mask.size(1)
        sel = lambda k: buf[k][idx, :c]  # noqa: E731  (the rollout's rows, cut to this minibatch's width)
        pg, pg_stats = policy_loss(logps, sel("logps"), sel("adv"), mask, p.cliprange)
        vf, vf_stats = value_loss(values, sel("values"), sel("returns"), mask, p.cliprange_value)
        return pg, vf, {**pg_stats, **vf_stats, "entropy": masked_mean(entropy, mask).item()}, idx

    def validation_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out mean reward on ppo.eval_prompts (fixed sampling seed: runs differ only by the model)."""
        from tinylm.posttrain.grpo import evaluate_rewards

        if not self.eval_rows:
            return {}
        p = self.cfg.ppo
        res = evaluate_rewards(self.net, self.tokenizer, self.eval_rows, self.reward_fns, p.eval_samples,
                               p.max_new_tokens, p.temperature, seed=self.cfg.seed, weights=self.weights.tolist())
        return {f"val_{k}": v for k, v in res.items()}


def check_config(cfg: Any) -> None:
    """ValueError naming the field for PPO settings that cannot work."""
    p = cfg.ppo
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ValueError("config: stage ppo runs in one process (no torchrun)")
    if bool(p.reward_model) == bool(p.reward):
        raise ValueError("config: set exactly one of ppo.reward_model (a reward model dir) and ppo.reward "
                         f"(rule functions, e.g. format,accuracy); got reward_model={p.reward_model!r}, "
                         f"reward={p.reward!r}")
    if p.value_model not in ("shared", "separate"):
        raise ValueError(f"config: ppo.value_model={p.value_model!r} is not one of shared, separate")
    if p.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"config: ppo.kl_estimator={p.kl_estimator!r} is not one of k1, k3")
    if p.rollout_size < 1 or p.rollout_size % cfg.batch_size:
        raise ValueError(f"config: ppo.rollout_size ({p.rollout_size}) must be a positive multiple of batch_size "
                         f"({cfg.batch_size}, completions per PPO minibatch)")
    for name in ("epochs", "max_new_tokens", "eval_samples"):
        if getattr(p, name) < 1:
            raise ValueError(f"config: ppo.{name} must be >= 1, got {getattr(p, name)}")
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        raise ValueError(f"config: ppo.gamma and ppo.lam must be in [0, 1], got {p.gamma}, {p.lam}")


def reward_source(cfg: Any, tokenizer: Any, device: Any) -> tuple[list, torch.Tensor]:
    """(reward functions, weights): the reward model as one function, or the rule functions."""
    from tinylm.posttrain.grpo import reward_weights
    from tinylm.posttrain.rewards import resolve_reward

    p = cfg.ppo
    if p.reward_model:
        from tinylm.posttrain.reward import RewardModelScorer

        fns = [RewardModelScorer(p.reward_model, tokenizer, device, max(cfg.seq_len, 256),
                                 cfg.data.allow_special_tokens)]
    else:
        fns = [resolve_reward(s.strip()) for s in p.reward.split(",") if s.strip()]
    return fns, reward_weights(p.reward_weights, fns)


def main(argv: list[str] | None = None) -> int:
    """`python -m tinylm.posttrain.ppo MODEL PROMPTS.jsonl (--reward-model DIR | --reward fns)`: held-out mean reward."""
    import argparse
    import sys

    from tinylm.models.loading import load_model
    from tinylm.posttrain.grpo import evaluate_rewards, load_prompts
    from tinylm.training.trainconfig import TrainConfig

    ap = argparse.ArgumentParser(prog="python -m tinylm.posttrain.ppo", description=main.__doc__)
    ap.add_argument("model")
    ap.add_argument("prompts")
    ap.add_argument("--reward-model", default="")
    ap.add_argument("--reward", default="")
    ap.add_argument("--allow-special-tokens", default="<answer>,</answer>",
                    help="special-token strings the reward model reads as control tokens (its data setting)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    cfg = TrainConfig()
    cfg.ppo.reward_model, cfg.ppo.reward = args.reward_model, args.reward
    cfg.data.allow_special_tokens = [s for s in args.allow_special_tokens.split(",") if s]
    try:
        model, tok = load_model(args.model, dtype="fp32")
        check_config(cfg)
        fns, w = reward_source(cfg, tok, "cpu")
        res = evaluate_rewards(model, tok, load_prompts(args.prompts), fns, args.samples, args.max_new_tokens,
                               args.temperature, seed=args.seed, weights=w.tolist())
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m tinylm.posttrain.ppo: error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v:.4f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
