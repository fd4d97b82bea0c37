"""A ReAct-style tool loop (Yao et al. 2023): generate, run the tool calls, feed results back, repeat.

One turn = the model answers the conversation so far; if the answer holds `<tool_call>` blocks
(tool_calls.py) each call runs (tools.py, pure functions) and its result is appended as a `tool`
message; otherwise the answer is final. Limits: `max_turns` model turns, `max_calls` calls per turn,
MAX_RESULT_CHARS per result, the model's context length. Two entry points share the protocol:

  run_agent      inference (`tinylm chat --tools`, Python API): text in, final answer + transcript out.
  agent_rollout  training (agentic RL, agent_rl.py): a batch of trajectories at the token level, where
                 the model's own sampled tokens are trained (mask 1) and the tool-result tokens that
                 the environment inserted between turns are context only (mask 0), as in Search-R1
                 (Jin et al. 2025) and ReTool (Feng et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tinylm.inference.tools import TOOLS, Tool, run_tool, specs
from tinylm.text.tool_calls import split_tool_calls


@dataclass
class AgentResult:
    answer: str                      # the final assistant content ("" if the turn limit was hit)
    messages: list[dict]             # the whole transcript (assistant tool_calls and tool results)
    n_calls: int = 0
    finished: bool = True            # False when max_turns ran out while the model still called tools


def _tool_messages(calls: list[dict], tools: dict[str, Tool], max_calls: int) -> list[dict]:
    out = []
    for k, c in enumerate(calls):
        fn = c["function"]
        result = run_tool(fn["name"], fn["arguments"], tools) if k < max_calls else \
            f"error: at most {max_calls} tool calls per turn"
        out.append({"role": "tool", "tool_call_id": c["id"], "name": fn["name"], "content": result})
    return out


def run_agent(model, tokenizer, messages: list[dict], tool_names: list[str] | None = None, max_turns: int = 4,
              max_calls: int = 4, max_new_tokens: int = 128, temperature: float = 0.0,
              enable_thinking: bool | None = None, on_event=None) -> AgentResult:
    """Answer the conversation, calling bundled tools as the model asks. on_event(message) sees each
    new assistant / tool message (e.g. to print it)."""
    from tinylm.data.formats import split_think
    from tinylm.inference.generate import SamplingParams, context_length, generate
    from tinylm.text.chat_format import render_prompt

    tool_defs = specs(tool_names)
    tools = {t["function"]["name"]: TOOLS[t["function"]["name"]] for t in tool_defs}
    msgs, n_calls = list(messages), 0
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    for _ in range(max_turns):
        ids = render_prompt(tokenizer, msgs, tools=tool_defs, enable_thinking=enable_thinking)
        if len(ids) + 1 > context_length(model):
            return AgentResult("", msgs, n_calls, False)
        params.max_new_tokens = min(max_new_tokens, context_length(model) - len(ids))
        out = generate(model, tokenizer, [ids], params)[0]
        reasoning, text = split_think(out.text)
        content, calls = split_tool_calls(text)
        reply = {"role": "assistant", "content": content}
        if reasoning:
            reply["reasoning_content"] = reasoning
        if calls:
            reply["tool_calls"] = calls
        msgs.append(reply)
        if on_event:
            on_event(reply)
        if not calls:
            return AgentResult(content, msgs, n_calls, True)
        results = _tool_messages(calls, tools, max_calls)
        n_calls += len(results)
        for r in results:
            msgs.append(r)
            if on_event:
                on_event(r)
    return AgentResult("", msgs, n_calls, False)


# ----------------------------------------------------------------------------- training rollouts

@dataclass
class Trajectory:
    """One multi-turn rollout: prompt ids, then everything after it with a loss mask."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)     # model tokens and inserted tool-result tokens
    mask: list[int] = field(default_factory=list)    # 1 = sampled by the model, 0 = inserted
    messages: list[dict] = field(default_factory=list)  # the conversation as messages (for rendering)
    tool_defs: list[dict] = field(default_factory=list)  # the OpenAI tools offered in this rollout
    answer: str = ""
    n_calls: int = 0
    n_bad_calls: int = 0             # <tool_call> blocks that did not parse, or errors from the tool
    done: bool = False


def _observation_ids(tokenizer, msgs: list[dict], n_tool: int, tool_defs: list[dict]) -> list[int]:
    """Token ids the template puts between the end of the last assistant turn (its <|im_end|>) and the
    next generation prompt: the last `n_tool` tool results; result text stays plain text (untrusted)."""
    from tinylm.text.special_tokens import encode_marked, literals_in
    from tinylm.text.tool_format import render_text

    before = render_text(tokenizer, msgs[:-n_tool], False, tool_defs)
    full = render_text(tokenizer, msgs, True, tool_defs)
    end = before.rstrip().__len__()                 # just after the assistant's end-of-turn token
    if not full.startswith(before[:end]):
        raise ValueError("chat template is not prefix-stable across a tool result")
    seg = full[end:]
    spans, pos = [], 0
    for m in msgs[-n_tool:]:
        i = seg.find(m["content"], pos)
        if i >= 0:
            spans.append((i, i + len(m["content"])))
            pos = i + len(m["content"])
    return list(encode_marked(tokenizer, seg, literals_in(tokenizer, seg, spans))[0])


@torch.no_grad()
def agent_rollout(model, tokenizer, prompts: list[list[dict]], tool_names: list[list[str]], max_turns: int,
                  max_new_tokens: int, temperature: float, eos_ids: tuple[int, ...],
                  generator: torch.Generator | None = None, max_calls: int = 4,
                  max_total_tokens: int | None = None) -> list[Trajectory]:
    """Sample one multi-turn trajectory per prompt (repeat prompts for a GRPO group); tool_names[i] are
    the bundled tools offered to prompt i.

    Each turn samples all unfinished trajectories together (grpo.sample on prompt + history); a turn
    that ends with <|im_end|> and holds tool calls gets the results appended and continues.
    """
    from tinylm.inference.sampler import sample
    from tinylm.text.chat_format import render_prompt

    trajs = []
    for p, names in zip(prompts, tool_names):
        defs = specs(names)
        trajs.append(Trajectory(list(render_prompt(tokenizer, p, tools=defs)), messages=list(p), tool_defs=defs))
    limit = max_total_tokens or max_turns * (max_new_tokens + 64)
    for _ in range(max_turns):
        live = [t for t in trajs if not t.done]
        if not live:
            break
        outs = sample(model, [t.prompt_ids + t.ids for t in live], max_new_tokens, temperature, eos_ids, generator)
        for t, out in zip(live, outs):
            _advance(tokenizer, t, out, eos_ids, max_calls, limit)
    for t in trajs:
        t.done = True
    return trajs


def _advance(tokenizer, t: Trajectory, out: list[int], eos_ids: tuple[int, ...], max_calls: int, limit: int) -> None:
    """Append one sampled turn to `t`; run its tool calls; mark it done when it answered or ran out."""
    t.ids += out
    t.mask += [1] * len(out)
    text = tokenizer.decode([x for x in out if x not in eos_ids], skip_special_tokens=False)
    content, calls = split_tool_calls(text)
    t.n_bad_calls += content.count("<tool_call>")
    ended = bool(out) and out[-1] in eos_ids
    if not calls or not ended:
        t.answer, t.done = (content if ended else ""), True
        return
    t.messages.append({"role": "assistant", "content": content, "tool_calls": calls})
    tools = {d["function"]["name"]: TOOLS[d["function"]["name"]] for d in t.tool_defs}
    results = _tool_messages(calls, tools, max_calls)
    t.n_calls += len(results)
    t.n_bad_calls += sum(r["content"].startswith("error:") for r in results)
    t.messages += results
    obs = _observation_ids(tokenizer, t.messages, len(results), t.tool_defs)
    if len(t.ids) + len(obs) >= limit:
        t.done = True
        return
    t.ids += obs
    t.mask += [0] * len(obs)


def trajectory_text(tokenizer, t: Trajectory) -> str:
    """The trajectory as text with a final `<|im_start|>assistant\\n{answer}` turn that rewards can read."""
    return tokenizer.decode(t.ids, skip_special_tokens=False)


def chat_with_tools(model, tokenizer, args) -> int:
    """`tinylm chat MODEL --tools all [--prompt TEXT]`: each answer runs the tool loop, printing the calls."""
    import json
    import sys

    names = None if args.tools == "all" else [n.strip() for n in args.tools.split(",") if n.strip()]
    specs(names)  # unknown names: one clear error before anything runs
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def show(m: dict) -> None:
        if m["role"] == "tool":
            print(f"  [{m['name']} -> {m['content']}]")
        for c in m.get("tool_calls") or []:
            print(f"  [call {c['function']['name']}({c['function']['arguments']})]")
        if m["role"] == "assistant" and m.get("content"):
            print(m["content"])

    def ask(text: str) -> None:
        res = run_agent(model, tokenizer, history + [{"role": "user", "content": text}], names, args.max_turns,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, on_event=show)
        if not res.finished:
            print(f"(stopped after {args.max_turns} turns)")
        history[:] = res.messages

    if args.prompt is not None:
        ask(args.prompt)
        return 0
    print(f"tinylm chat with tools {json.dumps(names or list(TOOLS))}; /exit to quit")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input(">>> "), None):
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text:
            ask(text)
    return 0
