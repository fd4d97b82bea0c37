"""Build the bundled tool-use set in data/tools/ from real computations (tinylm/inference/tools.py).

Every answer is what the tool really returns: each row's call is executed with the same functions the
agent loop and agentic RL run, and the final answer quotes that result. Five kinds of task, one tool call
each: arithmetic (calculator), unit conversion, days between dates, a date plus days, a lookup in the
bundled country table. Each row offers the needed tool (with --distractor, also a second, unneeded one in
random order, so that the model must choose: ~60% longer prompts, too slow for the CPU recipes). Half the SFT rows think briefly first (`reasoning_content`), half have thinking switched off
(`enable_thinking: false`, the empty <think></think> block), the mix Qwen3 trains with.

    python scripts/build_tool_data.py      # deterministic (fixed seed), rewrites data/tools/

Outputs (the held-out split shares no (task, arguments) with the others; its countries are unseen):
  train.jsonl / val.jsonl   SFT rows {"messages", "tools", "enable_thinking"?} (OpenAI format)
  rl_prompts.jsonl          {"prompt", "answer"} for agentic RL (recipes/agent_rl.yaml)
  rl_prompts_new_countries.jsonl   the RL prompts + lookups of countries no SFT row names, shuffled
                            (recipes/agent_rl_smollm2.yaml)
  warmup.jsonl (--warmup)   {"text"}: the train rows as short plain text, 4 a row (copying warm-up)
  test_prompts.jsonl        held-out {"prompt", "answer"}: tool-task accuracy (python -m tinylm.posttrain.agent_rl)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinylm.inference.tools import COUNTRIES, TOOLS, run_tool  # noqa: E402

SEED = 2026
HELD_OUT_COUNTRIES = {"chile", "norway", "kenya"}
# In the tool's table but in no SFT row: lookups of these only in rl_prompts_new_countries.jsonl, so that
# agentic RL meets countries the SFT model never saw (as the held-out split does) and can be rewarded
# for reading the field from the question rather than from the country it remembers.
RL_ONLY_COUNTRIES = ["italy", "spain", "sweden", "peru", "nigeria", "vietnam", "argentina", "thailand"]
FIRST_TRAIN = 3000


def arithmetic(rng: random.Random) -> tuple[str, str, dict]:
    op = rng.choice(["+", "-", "*"])
    a, b = rng.randint(10, 999), rng.randint(2, 99 if op == "*" else 999)
    q = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a}{op}{b}."])
    return q.format(a=a, b=b, op=op), "calculator", {"expression": f"{a}{op}{b}"}


def units(rng: random.Random) -> tuple[str, str, dict]:
    a, b = rng.choice([("km", "mile"), ("mile", "km"), ("kg", "lb"), ("lb", "kg"), ("ft", "m"), ("m", "ft"),
                       ("l", "gallon"), ("h", "min"), ("c", "f"), ("f", "c")])
    v = rng.choice([rng.randint(1, 500), round(rng.uniform(1, 100), 1)])
    return f"Convert {v} {a} to {b}.", "convert_units", {"value": v, "from_unit": a, "to_unit": b}


def _rand_date(rng: random.Random) -> dt.date:
    return dt.date(2020, 1, 1) + dt.timedelta(days=rng.randint(0, 2000))


def days_between(rng: random.Random) -> tuple[str, str, dict]:
    s = _rand_date(rng)
    e = s + dt.timedelta(days=rng.randint(1, 400))
    return f"How many days are there from {s} to {e}?", "date_diff", {"start": str(s), "end": str(e)}


def date_plus(rng: random.Random) -> tuple[str, str, dict]:
    d, n = _rand_date(rng), rng.randint(1, 300)
    return f"What date is {n} days after {d}?", "date_add", {"date": str(d), "days": n}


def lookup(rng: random.Random, countries: list[str]) -> tuple[str, str, dict]:
    c = rng.choice(countries)
    field, q = rng.choice([("capital", "What is the capital of {c}?"),
                           ("population_millions", "What is the population of {c} in millions?"),
                           ("area_km2", "What is the area of {c} in km2?"),
                           ("currency", "What is the currency of {c}?")])
    name = c.title()
    return q.format(c=name), "lookup_country", {"country": name, "field": field}


def final_answer(tool: str, args: dict, result: str) -> tuple[str, str]:
    """(assistant answer, gold answer for the reward) from the tool's real result."""
    if tool == "calculator":
        return f"{args['expression']} = {result}.", result
    if tool == "convert_units":
        return f"{args['value']} {args['from_unit']} is {result} {args['to_unit']}.", result
    if tool == "date_diff":
        return f"There are {result} days.", result
    if tool == "date_add":
        return f"It is {result}.", result.split(" ")[0]
    return f"The answer is {result}.", result


def warmup_text(sft: dict) -> str:
    """One SFT row as a short plain-text line: question, call, real result, answer. Copying numbers
    from a question or a tool result into the output needs induction heads (Olsson et al. 2022), and
    the quickstart model has none: its loss on a repeated random sequence does not drop on the repeat.
    Lines without the ~280-token tools block teach the copying at a fifth of the cost per example."""
    q, call, res, ans = (m.get("content", "") for m in sft["messages"])
    fn = sft["messages"][1]["tool_calls"][0]["function"]
    return f"{q}\n{json.dumps({'name': fn['name'], 'arguments': fn['arguments']})}\n{res}\n{ans}\n"


def make(rng: random.Random, countries: list[str]) -> tuple[str, str, dict]:
    kind = rng.choice(["arith", "arith", "units", "diff", "plus", "lookup"])
    if kind == "lookup":
        return lookup(rng, countries)
    return {"arith": arithmetic, "units": units, "diff": days_between, "plus": date_plus}[kind](rng)


def row(rng: random.Random, question: str, tool: str, args: dict, distractor: bool) -> tuple[dict, dict]:
    """(SFT row, RL prompt row) for one task, with its call really executed."""
    result = run_tool(tool, args)
    if result.startswith("error:"):
        raise RuntimeError(f"{tool}({args}) failed: {result}")
    answer, gold = final_answer(tool, args, result)
    offered = [tool, rng.choice([t for t in TOOLS if t != tool])] if distractor else [tool]
    rng.shuffle(offered)
    tools = [TOOLS[t].spec() for t in offered]
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": tool, "arguments": args}}]}
    sft = {"messages": [{"role": "user", "content": question}, call,
                        {"role": "tool", "content": result}, {"role": "assistant", "content": answer}],
           "tools": tools}
    if rng.random() < 0.5:
        sft["enable_thinking"] = False
    else:
        call["reasoning_content"] = f"I should use {tool}."
    return sft, {"prompt": question, "answer": gold, "tools": offered}


def build(n_train: int, n_val: int, n_rl: int, n_test: int, out_dir: str, distractor: bool = False,
          warmup: bool = False, n_rl_new: int = 300) -> dict[str, int]:
    rng = random.Random(SEED)
    seen_countries = [c for c in COUNTRIES if c not in HELD_OUT_COUNTRIES and c not in RL_ONLY_COUNTRIES]
    test, test_keys = [], set()
    while len(test) < n_test:  # held-out first: unseen countries, and its keys are excluded below
        q, tool, args = make(rng, sorted(HELD_OUT_COUNTRIES))
        key = (tool, json.dumps(args, sort_keys=True))
        if key not in test_keys:
            test_keys.add(key)
            test.append(row(rng, q, tool, args, distractor)[1])
    rows, keys = [], set(test_keys)
    while len(rows) < n_train + n_val + n_rl:
        q, tool, args = make(rng, seen_countries)
        key = (tool, json.dumps(args, sort_keys=True))
        if key not in keys:
            keys.add(key)
            rows.append(row(rng, q, tool, args, distractor))
    # Train rows past the first FIRST_TRAIN are drawn after val and RL, so those splits stay the rows
    # the first 3000-row version had (earlier results stay comparable).
    first = min(n_train, FIRST_TRAIN)
    train = rows[:first] + rows[first + n_val + n_rl:]
    val, rl = rows[first:first + n_val], rows[first + n_val:first + n_val + n_rl]
    os.makedirs(out_dir, exist_ok=True)
    files = {"train.jsonl": [r[0] for r in train],
             "val.jsonl": [r[0] for r in val],
             "rl_prompts.jsonl": [r[1] for r in rl],
             "test_prompts.jsonl": test}
    if n_rl_new:  # drawn last: the files above stay what they were without it
        new = [row(rng, *lookup(rng, RL_ONLY_COUNTRIES), distractor)[1] for _ in range(n_rl_new)]
        mixed = [r[1] for r in rl] + new
        rng.shuffle(mixed)
        files["rl_prompts_new_countries.jsonl"] = mixed
    if warmup:  # SFT train rows only, so no val / RL / held-out task leaks in
        texts = [warmup_text(r[0]) for r in train]
        files["warmup.jsonl"] = [{"text": "".join(texts[i:i + 4])} for i in range(0, len(texts), 4)]
    for name, items in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            for it in items:
                f.write(json.dumps(it, ensure_ascii=False) + "\n")
    return {k: len(v) for k, v in files.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "tools"))
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--rl", type=int, default=600)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--rl-new", type=int, default=300,
                    help="lookups of RL-only countries added to rl_prompts_new_countries.jsonl (0: no such file)")
    ap.add_argument("--distractor", action="store_true", help="offer a second, unneeded tool in every row")
    ap.add_argument("--warmup", action="store_true", help="also write warmup.jsonl (plain-text copying warm-up)")
    args = ap.parse_args()
    counts = build(args.train, args.val, args.rl, args.test, args.out, args.distractor, args.warmup, args.rl_new)
    print(" ".join(f"{k}={v}" for k, v in counts.items()), "->", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
