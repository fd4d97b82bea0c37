"""Reward functions for GRPO: plain Python callables, TRL-style.

A reward function has the signature

    f(prompts: list[str], completions: list[str], **kw) -> list[float]

where `kw` holds the other columns of the prompt rows (e.g. `answer=[...]`), one value per
completion. GRPO adds the rewards of all functions given, weighted by `grpo.reward_weights` (one
float per function, same order; default 1 each). Writing your own
is the intended extension point: no registry, just pass the function (or its dotted path
"mypkg.mymod:my_reward" in a recipe).

Built-ins (DeepSeek-R1 style rule-based rewards, Shao et al. 2024 / DeepSeek-AI 2025):
- `format_reward`: 1.0 when the completion is exactly <think>..</think><answer>..</answer>.
- `accuracy_reward`: 1.0 when the number inside <answer> equals the row's verifiable `answer`.
- `tag_count_reward`: a shaped 0..1 score (0.25 per tag present exactly once) that gives a
  signal before the model produces the full structure.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from tinylm.posttrain.reasoning import TAGS, is_well_formed, split_thinking

RewardFn = Callable[..., list[float]]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(completion: str) -> str | None:
    """The last number in the answer part of `completion` (None when there is none)."""
    _, answer = split_thinking(completion)
    nums = _NUMBER.findall(answer.replace(",", ""))
    return nums[-1] if nums else None


def _same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a.strip() == b.strip()


def format_reward(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """1.0 for a well-formed <think>...</think><answer>...</answer> completion, else 0.0."""
    return [1.0 if is_well_formed(c) else 0.0 for c in completions]


def tag_count_reward(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """0.25 for each of the four tags that occurs exactly once (shaped format signal)."""
    return [sum(0.25 for t in TAGS if c.count(t) == 1) for c in completions]


def accuracy_reward(prompts: list[str], completions: list[str], answer: list | None = None, **kw) -> list[float]:
    """1.0 when the final number in the answer equals the row's `answer` column, else 0.0."""
    if answer is None:
        raise ValueError("accuracy_reward needs an 'answer' column in the prompt rows")
    out = []
    for c, gold in zip(completions, answer):
        got = extract_answer(c)
        out.append(1.0 if got is not None and _same_number(got, str(gold)) else 0.0)
    return out


def final_answer(trajectory: str) -> str | None:
    """The final answer of a tool-use trajectory (agent.py): the last assistant turn, when it ended with
    <|im_end|> and called no tool; None otherwise (cut off, or still calling tools)."""
    last = trajectory.rsplit("<|im_start|>assistant\n", 1)[-1]
    if not last.rstrip().endswith("<|im_end|>") or "<tool_call>" in last:
        return None
    answer = last.rstrip()[:-len("<|im_end|>")]
    return answer.split("</think>")[-1].strip()


def tool_accuracy_reward(prompts: list[str], completions: list[str], answer: list | None = None,
                         **kw) -> list[float]:
    """1.0 when the trajectory's final answer holds the row's `answer` (the last number equals it, or
    for a non-numeric answer the text contains it, case-insensitive), else 0.0."""
    if answer is None:
        raise ValueError("tool_accuracy_reward needs an 'answer' column in the prompt rows")
    out = []
    for c, gold in zip(completions, answer):
        final = final_answer(c)
        if final is None:
            out.append(0.0)
            continue
        gold = str(gold)
        nums = _NUMBER.findall(final.replace(",", ""))
        if _NUMBER.fullmatch(gold.replace(",", "")):
            out.append(1.0 if nums and _same_number(nums[-1], gold.replace(",", "")) else 0.0)
        else:
            out.append(1.0 if gold.lower() in final.lower() else 0.0)
    return out


def tool_format_reward(prompts: list[str], completions: list[str], **kw) -> list[float]:
    """1.0 when the trajectory called a tool, every <tool_call> block is valid JSON naming a function, no
    tool returned an error, and it ends with a final answer; else 0.0. (Without "called a tool" a policy
    learns to skip the tools and answer at once: a first agentic-RL run did exactly that, docs/tools.md.)"""
    from tinylm.text.tool_calls import split_tool_calls

    out = []
    for c in completions:
        turns = c.split("<|im_start|>assistant\n")
        bad = any("<tool_call>" in split_tool_calls(t.split("<|im_end|>")[0])[0] for t in turns)
        called = "<tool_response>" in c
        out.append(0.0 if bad or not called or "error:" in c or not final_answer(c) else 1.0)
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "tag_count": tag_count_reward,
    "accuracy": accuracy_reward,
    "tool_accuracy": tool_accuracy_reward,
    "tool_format": tool_format_reward,
}


def resolve_reward(spec: str | RewardFn) -> RewardFn:
    """A built-in name ("format", "accuracy", "tag_count"), a "module:function" path, or a callable."""
    if callable(spec):
        return spec
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" in spec:
        mod, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward function {spec!r} not found: {e}") from None
        if not callable(fn):
            raise ValueError(f"reward {spec!r} is not callable")
        return fn
    raise ValueError(f"unknown reward {spec!r}; built-ins: {sorted(BUILTIN_REWARDS)} or 'module:function'")
