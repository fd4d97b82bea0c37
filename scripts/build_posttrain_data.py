"""Build the small post-training sets in data/posttrain/ (DPO, reasoning, GRPO, reward model, PPO).

Why: the dpo / reason / grpo recipes must run offline in minutes, and their data must be honest
and reproducible. Everything here is either generated (arithmetic with verifiable answers) or
derived from tinylm's bundled chat data (data/sft/train.jsonl, built by scripts/build_data.py).

    python scripts/build_posttrain_data.py      # deterministic (fixed seed), rewrites data/posttrain/

Outputs:
  reason.jsonl        chat rows whose assistant turn is <think>work</think><answer>result</answer>
  grpo_prompts.jsonl  {"prompt", "answer"} arithmetic prompts for GRPO training
  grpo_eval.jsonl     held-out {"prompt", "answer"}: no (operation, numbers) triple of it appears above
  dpo.jsonl           {"prompt", "chosen", "rejected"}: correct vs wrong arithmetic, and bundled chat
                      answers vs an off-topic answer (another question's) or a truncated one
  reward.jsonl        chat pairs only (--reward-arithmetic adds the arithmetic ones): every short bundled chat
                      turn (~3.3k) with 2-3 rejected answers: the reward model needs more pairs than DPO to
                      learn "is this answer about this question". Off-topic answers are filtered so that no
                      pair is ambiguous (reward_sets, off_topic_pool, generic_ok); dpo.jsonl is unfiltered
  reward_val.jsonl    its held-out pairs: 10% of the questions (none of them in reward.jsonl)
  ppo_prompts.jsonl   {"prompt"}: the closed chat questions of reward.jsonl (PPO with the reward model)
  ppo_eval.jsonl      {"prompt"}: 100 closed questions of reward_val.jsonl (PPO's held-out reward)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 2024

# (question template, thought template); {a} {b} numbers, {r} result, {s} operator symbol.
TEMPLATES = {
    "+": [("What is {a} + {b}?", "{a} + {b} = {r}."),
          ("Compute {a} plus {b}.", "{a} + {b} = {r}."),
          ("Tom has {a} apples and buys {b} more. How many apples does he have now?",
           "He starts with {a} and adds {b}: {a} + {b} = {r}."),
          ("计算 {a} + {b} 等于多少？", "{a} + {b} = {r}。")],
    "-": [("What is {a} - {b}?", "{a} - {b} = {r}."),
          ("Compute {a} minus {b}.", "{a} - {b} = {r}."),
          ("Anna has {a} coins and spends {b}. How many coins are left?",
           "She had {a} and spent {b}: {a} - {b} = {r}."),
          ("计算 {a} - {b} 等于多少？", "{a} - {b} = {r}。")],
    "*": [("What is {a} * {b}?", "{a} * {b} = {r}."),
          ("Compute {a} times {b}.", "{a} * {b} = {r}."),
          ("There are {a} boxes with {b} pens each. How many pens are there?",
           "{a} boxes of {b}: {a} * {b} = {r}."),
          ("计算 {a} × {b} 等于多少？", "{a} × {b} = {r}。")],
}
MAX_N = {"+": 20, "-": 20, "*": 9}  # operands in 0..MAX_N (subtraction keeps a >= b)


def result(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def think_answer(reasoning: str, answer: str) -> str:
    # same layout as tinylm.posttrain.reasoning.format_reasoning (kept local so the script runs without the package)
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


def problem(op: str, a: int, b: int, t: int) -> tuple[str, str, int]:
    q, th = TEMPLATES[op][t]
    r = result(op, a, b)
    s = "×" if "×" in q else op
    return q.format(a=a, b=b), th.format(a=a, b=b, r=r, s=s), r


def arithmetic_sets(rng: random.Random, n_eval: int) -> tuple[list, list, list, list]:
    triples = [(op, a, b) for op in "+-*" for a in range(MAX_N[op] + 1) for b in range(MAX_N[op] + 1)
               if op != "-" or a >= b]
    rng.shuffle(triples)
    held, train = triples[:n_eval], triples[n_eval:]
    reason, grpo, dpo = [], [], []
    for op, a, b in train:
        t1, t2 = rng.sample(range(len(TEMPLATES[op])), 2)
        q, th, r = problem(op, a, b, t1)
        reason.append({"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": think_answer(th, str(r))}]})
        q2, th2, _ = problem(op, a, b, t2)
        grpo.append({"prompt": q2, "answer": str(r)})
        wrong = r + rng.choice([-2, -1, 1, 2, 10])
        dpo.append({"prompt": q2, "chosen": think_answer(th2, str(r)),
                    "rejected": think_answer(th2.replace(f"= {r}", f"= {wrong}"), str(wrong))})
    evals = []
    for op, a, b in held:
        q, _, r = problem(op, a, b, rng.randrange(len(TEMPLATES[op])))
        evals.append({"prompt": q, "answer": str(r)})
    return reason, grpo, evals, dpo


def chat_pairs(sft_path: str, n: int, rng: random.Random) -> list[dict]:
    """Single-turn Q/A from the bundled SFT data -> (good answer, off-topic or truncated answer)."""
    qa = chat_qa(sft_path)  # short pairs fit seq_len 128
    rng.shuffle(qa)
    out = []
    for i, (q, a) in enumerate(qa[:n]):
        words = a.split()
        if i % 2 == 0 and len(words) >= 8:  # truncated: stops mid-sentence
            bad = " ".join(words[: len(words) // 3])
        else:  # off-topic: the answer to another question
            bad = qa[(i + 1 + rng.randrange(len(qa) - 1)) % len(qa)][1]
        if bad and bad != a:
            out.append({"prompt": q, "chosen": a, "rejected": bad})
    return out


def chat_qa(sft_path: str) -> list[tuple[str, str]]:
    """Sorted unique short single-turn (question, answer) pairs of the bundled chat data."""
    qa, seen = [], set()
    with open(sft_path, encoding="utf-8") as f:
        for line in f:
            msgs = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
            if len(msgs) < 2 or msgs[0]["role"] != "user" or msgs[1]["role"] != "assistant":
                continue
            q, a = msgs[0]["content"].strip(), msgs[1]["content"].strip()
            if q and a and len(q) + len(a) <= 400 and (q, a) not in seen:
                seen.add((q, a))
                qa.append((q, a))
    return sorted(qa)


# Label-quality filters of the reward pairs' off-topic answers (reward_sets).
_STOP = set("""a an the and or but if then so to of in on at by for with from as is are was were be been am do does did
have has had not no yes you your yours i me my mine we our us he she it its they them their this that these those
what which who whom whose when where why how there here can could would should will shall may might must just
about like really very too also more most some any all one get got go going know think well okay ok oh yeah sure
good much many out up down over into than only own same such""".split())
_GREETING = re.compile(r"(hi+|hello+|he+y+|heyo|hiya|sup|yo|howdy|good (morning|afternoon|evening)|你好|嗨|早上好)\b",
                       re.IGNORECASE)
_ABOUT_YOU = re.compile(r"\b(you|your|yours|yourself|u|ur)\b|你|您", re.IGNORECASE)


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def _content(text: str) -> set[str]:
    """Content words (latin words of >= 3 letters, not stop words) and CJK character bigrams."""
    words = {w for w in re.findall(r"[a-z]{3,}", text.lower()) if w not in _STOP}
    cjk = re.findall(r"[\u4e00-\u9fff]+", text)
    return words | {run[i:i + 2] for run in cjk for i in range(len(run) - 1)}


def _size(text: str) -> int:
    """Words, counting each CJK character as one."""
    return len(re.findall(r"[\u4e00-\u9fff]", text)) + len(re.sub(r"[\u4e00-\u9fff]", " ", text).split())


def off_topic_pool(qa: list[tuple[str, str]]) -> tuple[dict[str, set[str]], set[str]]:
    """(answers of each normalised question, answers specific enough to be an unambiguous off-topic negative).

    A chatterbot-style answer that fits many questions ("I don't know", "Yes", "Hi!", the identity answer)
    makes a mislabelled pair when it is drawn as "the wrong answer". Kept as negatives: answers of >= 4
    words (CJK characters count one each) given to one (normalised) question only in the whole corpus,
    to a question that has no other answer (open prompts such as "hey" or "tell me a joke" have many,
    and their answers fit other open prompts), and not opening with a greeting.
    """
    by_q: dict[str, set[str]] = {}
    qs_of: dict[str, set[str]] = {}
    for q, a in qa:
        by_q.setdefault(_norm(q), set()).add(a)
        qs_of.setdefault(_norm(a), set()).add(_norm(q))
    specific = {a for q, a in qa if _size(a) >= 4 and len(qs_of[_norm(a)]) == 1
                and len(by_q[_norm(q)]) == 1 and not _GREETING.match(a)}
    return by_q, specific


def generic_pool(qa: list[tuple[str, str]], specific: set[str]) -> dict[str, set[str]]:
    """Generic answers (greetings, the identity answer, "Yes", "Paris": the rest) -> content words of the
    questions they answer. A reward model that never sees one rejected ranks it above the right answer
    (PPO would then learn to say it everywhere), so each eligible question gets one as a negative."""
    out: dict[str, set[str]] = {}
    for q, a in qa:
        if a not in specific:
            out.setdefault(a, set()).update(_content(q))
    return out


def generic_ok(q: str, a: str, by_q: dict[str, set[str]], specific: set[str]) -> bool:
    """May question q (right answer a) get a generic negative without an ambiguous pair? Only a closed
    question (one answer in the corpus) with a specific right answer, not a greeting, not about the
    assistant itself ("you", 你: "I am tinylm ..." or "Yes" may be right there)."""
    return (len(by_q[_norm(q)]) == 1 and a in specific and not _GREETING.match(q)
            and not _ABOUT_YOU.search(q))


def reward_sets(arith: list[dict], qa: list[tuple[str, str]], rng: random.Random,
                val_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, held-out) reward pairs, split by question so no held-out question is trained on.

    Several rejected answers per question (Ouyang et al. 2022 rank K answers per prompt): for chat, two
    off-topic answers (other questions' answers, drawn from the same side of the split) and a truncated
    one (first third, when the answer has >= 8 words); for arithmetic, two different wrong results.
    An off-topic answer must be unambiguous (see `off_topic_pool`): specific (>= 4 words, given to one
    question only), not an answer to the same question (after normalising case and punctuation), and
    sharing no content word with the question or with the right answer (same topic: may fit too).
    Where `generic_ok`, one of the two is a generic answer instead (a greeting, "I am tinylm ...", a
    one-word reply) whose own questions share no content word with this one.
    """
    prompts = sorted({r["prompt"] for r in arith} | {q for q, _ in qa})
    rng.shuffle(prompts)
    held = set(prompts[: round(val_fraction * len(prompts))])
    by_q, specific = off_topic_pool(qa)
    generic = generic_pool(qa, specific)
    sides: tuple[list[dict], list[dict]] = ([], [])
    for r in arith:  # chosen/rejected differ only in the result: add a second wrong result
        right = r["chosen"].rsplit("<answer>\n", 1)[1].split("\n")[0]
        wrong = r["rejected"].rsplit("<answer>\n", 1)[1].split("\n")[0]
        other = str(int(right) + rng.choice([d for d in (-3, -2, -1, 1, 2, 3, 10, -10) if int(right) + d != int(wrong)]))
        second = r["chosen"].replace(f"= {right}", f"= {other}").replace(f"<answer>\n{right}\n", f"<answer>\n{other}\n")
        side = sides[r["prompt"] in held]
        side += [r, {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": second}]
    for k, side in enumerate(sides):
        mine = [(q, a) for q, a in qa if (q in held) == bool(k)]
        pool = sorted({a for _, a in mine if a in specific})
        # Generic negatives drawn as often as each answer occurs (not once per distinct answer): the identity
        # answer, given to ~150 questions, must lose somewhere too, or the reward model learns that it always wins.
        common = sorted(a for _, a in mine if a in generic)
        for q, a in mine:
            words, bad = a.split(), []
            same = by_q[_norm(q)]
            near = _content(q) | _content(a)
            if generic_ok(q, a, by_q, specific):  # one generic negative, asked of another topic
                for _ in range(50):
                    other = common[rng.randrange(len(common))]
                    if other not in same and not (_content(other) | generic[other]) & near:
                        bad.append(other)
                        break
            for _ in range(50):  # bounded: a question may get fewer than two off-topic answers
                if len(bad) == 2:
                    break
                other = pool[rng.randrange(len(pool))]
                if other not in same and other not in bad and not _content(other) & near:
                    bad.append(other)
            if len(words) >= 8:
                bad.append(" ".join(words[: len(words) // 3]))
            side += [{"prompt": q, "chosen": a, "rejected": b} for b in bad]
        rng.shuffle(side)
    return sides


def ppo_prompt_sets(train: list[dict], held: list[dict], qa: list[tuple[str, str]], rng: random.Random,
                    n_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """Chat prompts for PPO with the reward model: the questions of its training pairs, and `n_eval` of its
    held-out questions (never seen by the reward model or the policy's RL) for the held-out reward. Closed
    questions only (one answer in the corpus, see `off_topic_pool`): open ones ("hey") have no wrong answer."""
    by_q, _ = off_topic_pool(qa)

    def closed(rows: list[dict]) -> list[dict]:
        return [{"prompt": q} for q in sorted({r["prompt"] for r in rows}) if len(by_q.get(_norm(q), ())) == 1]

    evals = closed(held)
    return closed(train), sorted(rng.sample(evals, min(n_eval, len(evals))), key=lambda r: r["prompt"])


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "posttrain"))
    ap.add_argument("--sft", default=os.path.join(ROOT, "data", "sft", "train.jsonl"),
                    help="bundled chat data for the chat preference pairs")
    ap.add_argument("--eval", type=int, default=120, help="held-out arithmetic problems")
    ap.add_argument("--chat-pairs", type=int, default=600)
    ap.add_argument("--reward-seed", type=int, default=SEED + 1,
                    help="seed of reward.jsonl / reward_val.jsonl only (another draw of the same pairs)")
    ap.add_argument("--reward-arithmetic", action="store_true",
                    help="keep the arithmetic correct-vs-wrong pairs in reward.jsonl / reward_val.jsonl (a 4.8M "
                         "chat model judges them at chance: docs/post-training.md)")
    args = ap.parse_args()
    rng = random.Random(SEED)
    reason, grpo, evals, dpo = arithmetic_sets(rng, args.eval)
    if os.path.exists(args.sft):
        chat = chat_pairs(args.sft, args.chat_pairs, rng)
    else:
        print(f"note: {args.sft} not found (run scripts/build_data.py); dpo.jsonl has arithmetic pairs only")
        chat = []
    arithmetic = dpo[:300]
    dpo = arithmetic + chat
    rng.shuffle(dpo)
    # Own generator: adding this file leaves the other files byte-identical.
    rng_reward = random.Random(args.reward_seed)
    qa = chat_qa(args.sft) if chat else []
    reward, reward_val = reward_sets(arithmetic, qa, rng_reward)  # the same draws with or without arithmetic
    if not args.reward_arithmetic:
        math = {r["prompt"] for r in arithmetic}
        reward, reward_val = ([r for r in rows if r["prompt"] not in math] for rows in (reward, reward_val))
    ppo_prompts, ppo_eval = ppo_prompt_sets(reward, reward_val, qa, random.Random(SEED + 2))  # own draw
    write_jsonl(os.path.join(args.out, "reason.jsonl"), reason)
    write_jsonl(os.path.join(args.out, "grpo_prompts.jsonl"), grpo)
    write_jsonl(os.path.join(args.out, "grpo_eval.jsonl"), evals)
    write_jsonl(os.path.join(args.out, "dpo.jsonl"), dpo)
    write_jsonl(os.path.join(args.out, "reward.jsonl"), reward)
    write_jsonl(os.path.join(args.out, "reward_val.jsonl"), reward_val)
    write_jsonl(os.path.join(args.out, "ppo_prompts.jsonl"), ppo_prompts)
    write_jsonl(os.path.join(args.out, "ppo_eval.jsonl"), ppo_eval)
    print(f"reason {len(reason)}, grpo_prompts {len(grpo)}, grpo_eval {len(evals)}, "
          f"dpo {len(dpo)} ({len(chat)} from chat), reward {len(reward)} (held out {len(reward_val)}), "
          f"ppo_prompts {len(ppo_prompts)}, ppo_eval {len(ppo_eval)}")


if __name__ == "__main__":
    main()
