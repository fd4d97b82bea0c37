"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath; used for DeepSeek-R1).

PPO without a value network: for each prompt sample a group of G completions, score them with
rule-based rewards, and use the reward relative to the group as the advantage of every token:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)     (std scaling optional: scale_rewards)

The policy loss per completion token is PPO's clipped surrogate plus an optional k3 KL estimate
to a frozen reference (Schulman 2020, "Approximating KL divergence"):

    ratio = exp(logp - logp_old)
    l_t   = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * (exp(ref - logp) - (ref - logp) - 1)

Token losses are aggregated like TRL's `loss_type`:
    "grpo": mean over each completion's tokens, then mean over completions (the paper's 1/|o_i|)
    "bnpo": mean over all completion tokens of the micro-batch
    "dapo": sum over all tokens / all completion tokens of the optimizer step (DAPO, Yu et al. 2025)
Default here is "dapo", as in TRL >= 0.20: long completions are not under-weighted.
"cispo" (MiniMax-M1, 2025) replaces the clipped surrogate by REINFORCE weighted with a clipped,
stop-gradient importance weight, so no token's gradient is ever dropped by the clip:
    l_t = -sg(min(ratio, 1 + eps_high)) * A * logp      (token mean over the step, as "dapo")
(the paper sets no lower bound; TRL's `epsilon_high` is the bound itself, ours is 1 + epsilon_high).
With `grpo.tools` the rollouts are multi-turn and call tools (agent_rl.py).
Under tinylm's trainer (loss_sum / n_items summed over micro-batches) "dapo" is exactly the
step-level token mean; "bnpo" and "dapo" coincide with one micro-batch per step.

With one policy update per generation batch (num_iterations = 1, our setting) logp_old is
logp.detach(): the ratio is 1 but its gradient is the policy gradient A * grad logp.
"""

from __future__ import annotations

import torch

from tinylm.inference.sampler import (  # noqa: F401 (re-exported: grpo.sample etc.)
    eos_ids_of,
    load_prompts,
    prompt_messages,
    prompt_text,
    sample,
)

LOSS_TYPES = ("grpo", "bnpo", "dapo", "cispo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """rewards (N*G,) with the G completions of one prompt adjacent -> advantages (N*G,).

    scale_rewards: "group" divides by the group's std, "batch" by the whole batch's std, "none"
    only subtracts the group mean (Dr. GRPO, Liu et al. 2025). std is unbiased (Bessel), as in TRL.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards is not a multiple of group size {group_size}")
    grouped = rewards.view(-1, group_size)                                # (N, G)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)          # (N*G,)
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif scale_rewards == "none":
        return adv
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return adv / (std + 1e-4)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Clipped GRPO loss on completion tokens.

    logps, old_logps, ref_logps (B, T) per-token log-probs of the sampled completion tokens;
    advantages (B,); mask (B, T) 1 on real completion tokens. Returns (loss_sum, n_items,
    metrics): loss_sum / n_items is TRL's loss for this batch. n_items is the number of
    completions for "grpo" and the number of tokens for "bnpo"/"dapo".
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1)                                   # (B, 1)
    ratio = torch.exp(logps - old_logps)                            # (B, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)              # (B, T)
    if loss_type == "cispo":
        weight = torch.clamp(ratio, max=1 + eps_high).detach()     # (B, T) sg(clipped IS weight)
        per_token = -weight * adv * logps
    metrics: dict[str, float] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1                           # k3 estimator, >= 0
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).item()
    ntok = mask.sum().clamp(min=1)
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    metrics["clip_ratio"] = ((is_clipped * mask).sum() / ntok).item()
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
        return per_seq.sum(), logps.size(0), metrics
    if loss_type in ("bnpo", "dapo", "cispo"):
        return (per_token * mask).sum(), int(mask.sum().item()), metrics
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


# -- rollouts ---------------------------------------------------------------------------------

def pack_completions(prompt_ids: list[list[int]], completions: list[list[int]], device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion rows for one forward pass (shared by GRPO and PPO).

    Returns ids (B, T), attention mask (B, T), tgt_pos (B, C) = the position of each completion token
    in its row, and mask (B, C) = 1 on real completion tokens; C = the longest completion.
    """
    seqs = [p + c for p, c in zip(prompt_ids, completions)]
    t_max = max(len(s) for s in seqs)
    c_max = max(max(len(c) for c in completions), 1)
    b = len(seqs)
    ids = torch.zeros(b, t_max, dtype=torch.long, device=device)
    attn = torch.zeros(b, t_max, dtype=torch.long, device=device)
    tgt_pos = torch.zeros(b, c_max, dtype=torch.long, device=device)   # position of each completion token
    mask = torch.zeros(b, c_max, device=device)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, device=device)
        attn[i, : len(p) + len(c)] = 1
        tgt_pos[i, : len(c)] = torch.arange(len(p), len(p) + len(c), device=device)
        mask[i, : len(c)] = 1
    return ids, attn, tgt_pos, mask


def gather_completion_logps(logits: torch.Tensor, ids: torch.Tensor, tgt_pos: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) of packed rows -> per-token log-probs (B, C) of the completion tokens (0 on padding)."""
    pred = logits.gather(1, (tgt_pos - 1).clamp(min=0)[:, :, None].expand(-1, -1, logits.size(-1)))  # (B, C, V)
    logp = torch.log_softmax(pred.float(), dim=-1)
    tok = ids.gather(1, tgt_pos)                                         # (B, C)
    return logp.gather(2, tok[:, :, None]).squeeze(-1) * mask


def completion_logps(logits_fn, prompt_ids: list[list[int]], completions: list[list[int]],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given its prompt (one forward over prompt+completion).

    logits_fn(input_ids, attention_mask) -> logits (B, T, V), e.g. the policy or a ReferenceModel.
    Returns (logps (B, C), mask (B, C)) with C = the longest completion; rows are right-padded.
    """
    ids, attn, tgt_pos, mask = pack_completions(prompt_ids, completions, device)
    logits = logits_fn(ids, attn)                                        # (B, T, V)
    return gather_completion_logps(logits, ids, tgt_pos, mask), mask


# -- data and objective -----------------------------------------------------------------------------

def score(rows: list[dict], completions: list[str], reward_fns: list, group_size: int) -> torch.Tensor:
    """(N*G, n_funcs) rewards; row i's extra columns are repeated for its G completions."""
    prompts = [prompt_text(r) for r in rows for _ in range(group_size)]
    extra_keys = sorted({k for r in rows for k in r if k != "prompt"})
    kw = {k: [r.get(k) for r in rows for _ in range(group_size)] for k in extra_keys}
    cols = []
    for fn in reward_fns:
        vals = fn(prompts, completions, **kw)
        if len(vals) != len(completions):
            raise ValueError(f"reward {getattr(fn, '__name__', fn)} returned {len(vals)} values for "
                             f"{len(completions)} completions")
        cols.append(torch.tensor([float(v) for v in vals]))
    return torch.stack(cols, dim=1)


def rollout(model, tokenizer, rows: list[dict], group_size: int, max_new_tokens: int, temperature: float,
            generator: torch.Generator | None = None) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Sample G completions per row -> (prompt ids, completion ids, completion texts), N*G each."""
    from tinylm.text.chat_format import render_prompt

    eos = eos_ids_of(model, tokenizer)
    prompt_ids = [render_prompt(tokenizer, prompt_messages(r)) for r in rows for _ in range(group_size)]
    comps = sample(model, prompt_ids, max_new_tokens, temperature, eos, generator)
    texts = [tokenizer.decode([t for t in c if t not in eos], skip_special_tokens=False) for c in comps]
    return prompt_ids, comps, texts


def reward_weights(weights: list[float] | None, reward_fns: list) -> torch.Tensor:
    """(F,) weights of the reward functions (all 1 when `weights` is empty); lengths must match."""
    if not weights:
        return torch.ones(len(reward_fns))
    if len(weights) != len(reward_fns):
        names = ", ".join(getattr(f, "__name__", str(f)) for f in reward_fns)
        raise ValueError(f"config: grpo.reward_weights has {len(weights)} values for {len(reward_fns)} reward "
                         f"functions ({names}); give one weight per function, in the same order")
    return torch.tensor([float(w) for w in weights])


@torch.no_grad()
def evaluate_rewards(model, tokenizer, rows: list[dict], reward_fns: list, samples: int = 4,
                     max_new_tokens: int = 64, temperature: float = 1.0, batch_prompts: int = 16,
                     seed: int = 0, weights: list[float] | None = None, tools: list[str] | None = None,
                     max_turns: int = 1) -> dict[str, float]:
    """Mean reward on (held-out) prompts: `samples` sampled completions each (temperature 0 = greedy).

    `reward` is the weighted sum over the functions (as in training); `rewards/<fn>` each unweighted mean.
    """
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    w = reward_weights(weights, reward_fns)
    all_r = []
    for i in range(0, len(rows), batch_prompts):
        chunk = rows[i:i + batch_prompts]
        if tools:  # multi-turn tool rollouts (agent_rl.py)
            from tinylm.posttrain.agent_rl import tool_rollout

            texts = tool_rollout(model, tokenizer, chunk, samples, max_new_tokens, temperature, tools, max_turns, g)[2]
        else:
            _, _, texts = rollout(model, tokenizer, chunk, samples, max_new_tokens, temperature, g)
        all_r.append(score(chunk, texts, reward_fns, samples))
    r = torch.cat(all_r)  # (N*S, F)
    out = {"reward": (r * w).sum(1).mean().item()}
    for j, fn in enumerate(reward_fns):
        out[f"rewards/{getattr(fn, '__name__', j)}"] = r[:, j].mean().item()
    return out


class GRPOObjective:
    """Stage `grpo`: each micro-batch takes batch_size // group_size prompts from `data.train`, samples
    grpo.group_size completions for each, scores them and returns the clipped policy loss.
    `batch_size` counts completions, as TRL's per_device_train_batch_size."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def setup(self, model, tokenizer, cfg, device) -> None:
        from tinylm.posttrain.dpo import ReferenceModel
        from tinylm.posttrain.rewards import resolve_reward

        g = cfg.grpo
        if g.group_size < 2:
            raise ValueError(f"config: grpo.group_size must be >= 2 (advantages are relative to the group), "
                             f"got {g.group_size}")
        if cfg.batch_size % g.group_size:
            raise ValueError(f"config: batch_size ({cfg.batch_size} completions per micro-batch) must be a "
                             f"multiple of grpo.group_size ({g.group_size})")
        if g.loss_type not in LOSS_TYPES:
            raise ValueError(f"config: grpo.loss_type={g.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if g.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"config: grpo.scale_rewards={g.scale_rewards!r} is not one of group, batch, none")
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.policy = model  # unwrapped: sampling reads model.config; the loss calls the (maybe wrapped) model
        self.reward_fns = [resolve_reward(s.strip()) for s in g.reward.split(",") if s.strip()]
        if not self.reward_fns:
            raise ValueError("config: grpo.reward is empty (e.g. 'format,accuracy')")
        self.weights = reward_weights(g.reward_weights, self.reward_fns)  # (F,)
        self.eval_rows = load_prompts(g.eval_prompts) if g.eval_prompts else None
        if g.eval_samples < 1:
            raise ValueError(f"config: grpo.eval_samples must be >= 1, got {g.eval_samples}")
        self.ref = ReferenceModel(model, cfg, device, path=g.ref_model) if g.beta else None
        self.sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def batches(self, split: str, rank: int = 0, world_size: int = 1):
        from tinylm.posttrain.dpo import RowIterator

        if split != "train":
            return iter(())  # held-out rewards: grpo.eval_prompts (validation_metrics) or `python -m tinylm.posttrain.grpo`
        rows = load_prompts(self.cfg.data.train)
        n = self.cfg.batch_size // self.cfg.grpo.group_size
        return RowIterator(rows, n, lambda r: {"rows": r, "n_tokens": 0}, rank, world_size, self.cfg.seed)

    def sample_ids(self, text: str) -> list[int]:
        from tinylm.text.chat_format import render_prompt

        return list(render_prompt(self.tokenizer, [{"role": "user", "content": text}]))

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        g = self.cfg.grpo
        rows = batch["rows"]
        keep = None
        if g.tools:  # agentic RL: multi-turn rollouts that run tools; tool-result tokens leave the loss
            from tinylm.posttrain.agent_rl import tool_rollout

            prompt_ids, comps, texts, keep = tool_rollout(self.policy, self.tokenizer, rows, g.group_size,
                                                          g.max_new_tokens, g.temperature, g.tools, g.max_turns,
                                                          self.sample_gen)
        else:
            prompt_ids, comps, texts = rollout(self.policy, self.tokenizer, rows, g.group_size, g.max_new_tokens,
                                               g.temperature, self.sample_gen)
        batch["sampled_tokens"] = sum(len(p) + len(c) for p, c in zip(prompt_ids, comps))  # for tokens/s
        r = score(rows, texts, self.reward_fns, g.group_size)          # (N*G, F)
        rewards = (r * self.weights).sum(1)                              # (N*G,) weighted sum
        adv = group_advantages(rewards, g.group_size, g.scale_rewards).to(self.device)
        policy = lambda ids, attn: model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # noqa: E731
        logps, mask = completion_logps(policy, prompt_ids, comps, self.device)
        if keep is not None:
            mask = mask * keep.to(mask.device)                           # (B, C)
        ref_logps = completion_logps(self.ref, prompt_ids, comps, self.device)[0] if self.ref else None
        loss_sum, n, metrics = grpo_loss(logps, logps.detach(), adv, mask, ref_logps, g.beta, g.epsilon,
                                         g.epsilon_high or None, g.loss_type)
        std = rewards.view(-1, g.group_size).std(1)
        metrics.update({
            "reward": rewards.mean().item(),
            "reward_std": std.mean().item(),
            "frac_reward_zero_std": (std < 1e-6).float().mean().item(),
            "completion_len": mask.sum(1).mean().item(),
        })
        for j, fn in enumerate(self.reward_fns):
            metrics[f"rewards/{getattr(fn, '__name__', j)}"] = r[:, j].mean().item()
        return loss_sum, n, metrics

    def validation_metrics(self, model) -> dict[str, float]:
        """Held-out mean reward on grpo.eval_prompts (logged by the trainer as a validation row).

        The loss is ~0 on-policy whatever happens, so this is GRPO's learning curve. Sampling uses a
        fixed seed, so successive evaluations differ only through the model.
        """
        if not self.eval_rows:
            return {}
        g = self.cfg.grpo
        res = evaluate_rewards(self.policy, self.tokenizer, self.eval_rows, self.reward_fns, g.eval_samples,
                               g.max_new_tokens, g.temperature, seed=self.cfg.seed, weights=g.reward_weights,
                               tools=g.tools or None, max_turns=g.max_turns)
        return {f"val_{k}": v for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    """`python -m tinylm.posttrain.grpo MODEL PROMPTS.jsonl`: mean rewards of a model on (held-out) prompts."""
    import argparse

    from tinylm.models.loading import load_model
    from tinylm.posttrain.rewards import resolve_reward

    ap = argparse.ArgumentParser(prog="python -m tinylm.posttrain.grpo", description=main.__doc__)
    ap.add_argument("model")
    ap.add_argument("prompts")
    ap.add_argument("--reward", default="format,accuracy")
    ap.add_argument("--reward-weights", default="", help="comma-separated weights, one per reward function")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    fns = [resolve_reward(s.strip()) for s in args.reward.split(",")]
    weights = [float(w) for w in args.reward_weights.split(",") if w.strip()]
    res = evaluate_rewards(model, tok, load_prompts(args.prompts), fns, args.samples, args.max_new_tokens,
                           args.temperature, seed=args.seed, weights=weights)
    print(" ".join(f"{k}={v:.4f}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
