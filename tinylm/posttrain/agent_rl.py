"""Agentic RL: GRPO whose rollouts call tools (stage `grpo` with `grpo.tools` set; recipes/agent_rl.yaml).

A rollout is a multi-turn trajectory (agent.agent_rollout): the model writes `<tool_call>` blocks, the
bundled tools run inside the rollout, their results are inserted as tool turns, the model continues,
until it answers or `grpo.max_turns` runs out. GRPO then treats the tokens after the prompt as the
"completion", with one change: tokens the environment inserted (tool results and the template around
them) are masked out of the loss, so the policy gradient only touches what the model sampled (as in
Search-R1, Jin et al. 2025; ReTool, Feng et al. 2025). Rewards read the trajectory text: the built-ins
`tool_accuracy` (final answer right) and `tool_format` (valid calls, no tool errors, a final answer),
rewards.py. `grpo.loss_type: cispo` (MiniMax-M1, 2025) is the usual pairing: grpo.py.
"""

from __future__ import annotations

import json

import torch

from tinylm.inference.agent import Trajectory, agent_rollout, trajectory_text


def tool_rollout(model, tokenizer, rows: list[dict], group_size: int, max_new_tokens: int, temperature: float,
                 tools: list[str], max_turns: int, generator: torch.Generator | None = None
                 ) -> tuple[list[list[int]], list[list[int]], list[str], torch.Tensor]:
    """G trajectories per row -> (prompt ids, completion ids, trajectory texts, keep (B, C)), where keep
    is 1 on tokens the model sampled and 0 on inserted tool-result tokens and padding."""
    from tinylm.inference.sampler import eos_ids_of, prompt_messages

    eos = eos_ids_of(model, tokenizer)
    prompts = [prompt_messages(r) for r in rows for _ in range(group_size)]
    names = [r.get("tools") or tools for r in rows for _ in range(group_size)]  # a row may offer its own
    trajs = agent_rollout(model, tokenizer, prompts, names, max_turns, max_new_tokens, temperature, eos, generator)
    return ([t.prompt_ids for t in trajs], [t.ids for t in trajs], [trajectory_text(tokenizer, t) for t in trajs],
            keep_mask(trajs))


def keep_mask(trajs: list[Trajectory]) -> torch.Tensor:
    """(B, C) float mask over the packed completions (grpo.pack_completions layout: right-padded)."""
    c = max(max(len(t.mask) for t in trajs), 1)
    keep = torch.zeros(len(trajs), c)
    for i, t in enumerate(trajs):
        keep[i, : len(t.mask)] = torch.tensor(t.mask, dtype=torch.float32)
    return keep


@torch.no_grad()
def tool_accuracy(model, tokenizer, rows: list[dict], tools: list[str], max_turns: int = 4,
                  max_new_tokens: int = 96, batch: int = 16, failures: list | None = None) -> dict[str, float]:
    """Greedy held-out tool-task accuracy: the fraction of rows whose final answer is right, the fraction
    with a well-formed trajectory, the mean number of tool calls, and the accuracy per offered tool
    (`accuracy_<tool>`, rows keyed by their first tool). Wrong rows are appended to `failures`."""
    from tinylm.inference.sampler import eos_ids_of, prompt_messages
    from tinylm.posttrain.rewards import tool_accuracy_reward, tool_format_reward

    eos = eos_ids_of(model, tokenizer)
    acc, fmt, calls = [], [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        trajs = agent_rollout(model, tokenizer, [prompt_messages(r) for r in chunk],
                              [r.get("tools") or tools for r in chunk], max_turns, max_new_tokens, 0.0, eos)
        texts = [trajectory_text(tokenizer, t) for t in trajs]
        right = tool_accuracy_reward([], texts, answer=[r["answer"] for r in chunk])
        acc += right
        fmt += tool_format_reward([], texts)
        calls += [t.n_calls for t in trajs]
        if failures is not None:
            failures += [{**r, "trajectory": x} for r, x, ok in zip(chunk, texts, right) if not ok]
    n = max(len(acc), 1)
    res = {"accuracy": sum(acc) / n, "format": sum(fmt) / n, "calls": sum(calls) / n}
    kinds = [(r.get("tools") or tools)[0] for r in rows]
    for kind in sorted(set(kinds)):
        hits = [a for a, k in zip(acc, kinds) if k == kind]
        res[f"accuracy_{kind}"] = sum(hits) / len(hits)
    return res


def main(argv: list[str] | None = None) -> int:
    """`python -m tinylm.posttrain.agent_rl MODEL data/tools/test_prompts.jsonl`: held-out tool-task accuracy (greedy)."""
    import argparse

    from tinylm.inference.sampler import load_prompts
    from tinylm.inference.tools import TOOLS
    from tinylm.models.loading import load_model

    ap = argparse.ArgumentParser(prog="python -m tinylm.posttrain.agent_rl", description=main.__doc__)
    ap.add_argument("model")
    ap.add_argument("prompts")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)  # per turn: a think note + a date or unit call is up to ~75
    ap.add_argument("--failures", default="", help="write the wrong rows with their trajectories to this jsonl")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model)
    failures: list[dict] = []
    res = tool_accuracy(model, tok, load_prompts(args.prompts), args.tools.split(","), args.max_turns,
                        args.max_new_tokens, failures=failures)
    print(" ".join(f"{k}={v:.4f}" for k, v in res.items()))
    if args.failures:
        with open(args.failures, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in failures)
        print(f"{len(failures)} wrong rows -> {args.failures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
