"""`tinylm eval`: perplexity, multiple-choice benchmarks and exact-match generation on local files.

Why these three: perplexity / bits-per-byte tracks pretraining quality on any text; multiple choice
(C-Eval, CMMLU, MMLU) is how small Chinese/English chat models are compared on leaderboards; exact
match on GSM8K-style problems checks that reasoning outputs are right *and* well formed.

Scoring follows the log-likelihood idea of the MMLU paper (Hendrycks et al. 2021) and
lm-evaluation-harness (Gao et al. 2023): no sampling, only forward passes.
  letter  - prompt lists the options, ends with "Answer:"; the prediction is the letter whose token
            has the highest log-probability as the next token (variants " A"/"A" summed in probability).
  option  - cloze form: log P(option text | question) / bytes(option text)  (acc_norm, OLMES, Gu et al. 2024).
Bits per byte = total nats / ln 2 / total UTF-8 bytes, comparable across tokenizers (Gao et al. 2020, The Pile).

Sequences are LEFT-padded with explicit position_ids, so the continuations of all rows end at the
same column and only the last `keep` positions need logits (`logits_to_keep`): memory stays
O(batch * keep * vocab) even for long few-shot prompts.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import warnings
from pathlib import Path

from tinylm.evaluation.benchmarks import (
    LETTERS,
    MCQItem,
    answer_sep,
    build_prompt,
    load_gen,
    load_mcq,
    load_texts,
    pick_shots,
)
from tinylm.text.chat_format import render_prompt
from tinylm.text.special_tokens import encode_text

TASKS = ("ppl", "ceval", "cmmlu", "mmlu", "mcq", "gen", "reward")
FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)


# ---------------------------------------------------------------------------------------------
# Model plumbing

def load_for_eval(spec: str, lora: str | None = None, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) in eval mode for a tinylm / HF causal-LM directory (or preset), + optional LoRA."""
    import torch

    from tinylm.models.loading import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(spec, dtype=dtype, device=device)
    if lora:
        try:
            from tinylm.models.lora import load_adapter
        except ImportError:
            raise ValueError(f"--lora {lora}: LoRA support (tinylm.models.lora.load_adapter) is not available") from None
        if not Path(lora).is_dir():
            raise FileNotFoundError(f"{lora}: LoRA adapter directory not found")
        model = load_adapter(model, lora) or model
    model.eval()
    return model, tok


def context_length(model, tokenizer=None) -> int:
    """Longest sequence the model was built for (config.max_position_embeddings, else the tokenizer's)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None):
        from tinylm.models.config import context_length as config_context  # the one definition (YaRN-aware)

        return config_context(cfg)
    for key in ("max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 10**7 else 2048


def usable_length(model, tokenizer, max_length: int | None) -> int:
    """--max-length, or the model's context; longer than the context is refused: positions past it
    were never trained, so scores there say nothing about the model."""
    ctx = context_length(model, tokenizer)
    if max_length is None:
        return ctx
    if max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {max_length}")
    if max_length > ctx:
        raise ValueError(f"--max-length {max_length} is longer than the model's context of {ctx} tokens; "
                         f"use --max-length {ctx} or less")
    return max_length


def _pad_id(tok) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, 0):
        if v is not None:
            return v if isinstance(v, int) else v[0]
    return 0


def _device(model):
    return next(model.parameters()).device


def _forward_last(model, seqs: list[list[int]], keep: int, pad_id: int):
    """Left-pad `seqs`, run the model, return log-probs of the last `keep` positions: (B, keep, V)."""
    import torch

    dev = _device(model)
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = torch.tensor(s)
        mask[i, t - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) real positions start at 0 in every row
    kw = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=False)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = keep
    with torch.no_grad():
        logits = model(**kw).logits[:, -keep:].float()
    return torch.log_softmax(logits, dim=-1)


def _batches(lengths: list[int], batch_size: int, keep: int, vocab: int, budget: float = 2.5e8):
    """Index batches, longest first, with batch*keep*vocab floats under `budget` (1 GB)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = max(1, min(batch_size, int(budget // max(1, keep * vocab))))
    for i in range(0, len(order), rows):
        yield order[i:i + rows]


def score_continuations(model, tokenizer, requests: list[tuple[list[int], list[int]]],
                        batch_size: int = 8) -> list[float]:
    """Sum of log P(cont | ctx) for each (ctx_ids, cont_ids) pair (ctx must be non-empty)."""
    import torch

    pad, vocab = _pad_id(tokenizer), model.config.vocab_size
    out = [0.0] * len(requests)
    keep_all = max(len(c) for _, c in requests) + 1
    for idx in _batches([len(a) + len(b) for a, b in requests], batch_size, keep_all, vocab):
        keep = max(len(requests[i][1]) for i in idx) + 1
        logp = _forward_last(model, [requests[i][0] + requests[i][1] for i in idx], keep, pad)
        for row, i in enumerate(idx):
            cont = requests[i][1]
            lp = logp[row, keep - 1 - len(cont): keep - 1]  # positions predicting each cont token
            out[i] = float(lp.gather(-1, torch.tensor(cont, device=lp.device)[:, None]).sum())
    return out


# ---------------------------------------------------------------------------------------------
# Multiple choice

def _letter_token_ids(tokenizer, prompt_ids: list[int], prompt: str, letter: str, sep: str) -> list[int]:
    """Single tokens that spell the answer letter right after the prompt (natural split, "A", " A")."""
    ids = set()
    full = encode_text(tokenizer, prompt + sep + letter)
    if len(full) == len(prompt_ids) + 1 and full[:-1] == prompt_ids:
        ids.add(full[-1])
    for text in (letter, " " + letter):
        enc = encode_text(tokenizer, text)
        if len(enc) == 1:
            ids.add(enc[0])
    return sorted(ids)


def _split_cont(tokenizer, ctx: str, cont: str) -> tuple[list[int], list[int]]:
    """Token ids of ctx and cont such that ctx+cont tokenizes as in the joined string when possible."""
    ctx_ids = encode_text(tokenizer, ctx)
    full = encode_text(tokenizer, ctx + cont)
    if full[: len(ctx_ids)] == ctx_ids and len(full) > len(ctx_ids):
        return ctx_ids, full[len(ctx_ids):]
    return ctx_ids, encode_text(tokenizer, cont)


def _bos(tokenizer) -> list[int]:
    b = tokenizer.bos_token_id
    return [b] if isinstance(b, int) else []


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def _check_length(n: int, max_len: int, shots: int, where: str, shorter) -> None:
    if n <= max_len:
        return
    fit = next((k for k in range(shots - 1, -1, -1) if shorter(k) <= max_len), None)
    hint = ((f"use --shots {fit}" + (" or fewer" if fit else "")) if fit is not None
            else f"even the 0-shot prompt is {shorter(0)} tokens; use a model with a longer context")
    raise ValueError(f"{where}: {shots}-shot prompt is {n} tokens but the model context is {max_len} tokens; {hint}")


def evaluate_mcq(model, tokenizer, task: str, data: str | None = None, shots: int = 0, limit: int | None = None,
                 scoring: str = "letter", split: str | None = None, batch_size: int = 8,
                 max_length: int | None = None) -> dict:
    """Accuracy per subject and overall on a multiple-choice benchmark (limit = per subject)."""
    import torch

    if scoring not in ("letter", "option"):
        raise ValueError(f"--scoring must be 'letter' or 'option', not {scoring!r}")
    ds = load_mcq(task, data, split)
    max_len = usable_length(model, tokenizer, max_length)
    sep, bos = answer_sep(task), _bos(tokenizer)
    items: list[MCQItem] = [it for s in ds.eval for it in ds.eval[s][:limit]]

    def prompt_ids(it: MCQItem, k: int) -> tuple[str, list[int]]:
        text = build_prompt(task, ds.subject_names[it.subject], it, pick_shots(ds, it, k), scoring)
        return text, bos + encode_text(tokenizer, text)

    preds: list[int] = []
    if scoring == "letter":
        fast, slow = [], []  # fast: every letter is one token -> one forward position per question
        for it in items:
            text, ids = prompt_ids(it, shots)
            _check_length(len(ids) + 1, max_len, shots, it.source, lambda k, it=it: len(prompt_ids(it, k)[1]) + 1)
            letter_ids = [_letter_token_ids(tokenizer, ids[len(bos):], text, LETTERS[j], sep)
                          for j in range(len(it.choices))]
            (fast if all(letter_ids) else slow).append((it, text, ids, letter_ids))
        scores: dict[int, list[float]] = {}
        for idx in _batches([len(f[2]) for f in fast], batch_size, 1, model.config.vocab_size):
            logp = _forward_last(model, [fast[i][2] for i in idx], 1, _pad_id(tokenizer))[:, 0]  # (B, V)
            for row, i in enumerate(idx):
                scores[id(fast[i][0])] = [float(torch.logsumexp(logp[row, v], 0)) for v in fast[i][3]]
        reqs, owners = [], []
        for it, text, _ids, _ in slow:  # a letter needs several tokens: score it as a continuation
            for j in range(len(it.choices)):
                c_ids, cont = _split_cont(tokenizer, text, sep + LETTERS[j])
                reqs.append((bos + c_ids, cont))
                owners.append(it)
        if reqs:
            for it, s in zip(owners, score_continuations(model, tokenizer, reqs, batch_size)):
                scores.setdefault(id(it), []).append(s)
        preds = [_argmax(scores[id(it)]) for it in items]
    else:
        reqs, owners = [], []
        for it in items:
            text, _ = prompt_ids(it, shots)
            for choice in it.choices:
                c_ids, cont = _split_cont(tokenizer, text, sep + choice)
                n = len(bos) + len(c_ids) + len(cont)
                _check_length(n, max_len, shots, it.source,
                              lambda k, it=it, cont=cont: len(prompt_ids(it, k)[1]) + len(cont))
                reqs.append((bos + c_ids, cont))
                owners.append((it, len((sep + choice).encode("utf-8"))))
        raw = score_continuations(model, tokenizer, reqs, batch_size)
        by_item: dict[int, list[float]] = {}
        for (it, nbytes), s in zip(owners, raw):
            by_item.setdefault(id(it), []).append(s / max(1, nbytes))  # length-normalised (per byte)
        preds = [_argmax(by_item[id(it)]) for it in items]

    used = [len(pick_shots(ds, it, shots)) for it in items] if shots else [0]
    if min(used) < shots:  # a subject with fewer dev questions than asked: say so, record it
        short = sorted({ds.subject_names.get(it.subject, it.subject) for it, u in zip(items, used) if u < shots})
        warnings.warn(f"{task}: only {min(used)} example(s) available for --shots {shots} in "
                      f"{', '.join(short[:5])}{' ...' if len(short) > 5 else ''}; those prompts use fewer shots",
                      stacklevel=2)
    subjects: dict[str, dict] = {}
    for it, p in zip(items, preds):
        s = subjects.setdefault(it.subject, {"correct": 0, "n": 0, "random": 0.0})
        s["correct"] += int(p == it.answer)
        s["n"] += 1
        s["random"] += 1.0 / len(it.choices)
    for s in subjects.values():
        s["acc"], s["random"] = s["correct"] / s["n"], s["random"] / s["n"]
    n = sum(s["n"] for s in subjects.values())
    return {
        "task": task, "scoring": scoring, "shots": shots, "shots_used": [min(used), max(used)], "n": n,
        "acc": sum(s["correct"] for s in subjects.values()) / max(1, n),
        "macro_acc": sum(s["acc"] for s in subjects.values()) / max(1, len(subjects)),
        "random": sum(s["random"] * s["n"] for s in subjects.values()) / max(1, n),
        "subjects": subjects,
    }


# ---------------------------------------------------------------------------------------------
# Perplexity / bits per byte

def _doc_separator(tok) -> int:
    """Token the first text token is predicted from: <|endoftext|> (tinylm, GPT-2 style), else eos."""
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(sep, int) and sep != tok.unk_token_id:
        return sep
    eos = tok.eos_token_id
    return eos if isinstance(eos, int) else (eos[0] if eos else _pad_id(tok))


def evaluate_ppl(model, tokenizer, data: str | None = None, limit: int | None = None,
                 max_length: int | None = None, stride: int | None = None, batch_size: int = 8) -> dict:
    """Loss, perplexity and bits/byte with a sliding window: each token is predicted once, with at
    least (window - stride) tokens of context after the first window (as in the HF perplexity guide)."""
    docs = load_texts(data)[:limit]
    window = usable_length(model, tokenizer, max_length)
    stride = min(stride or max(1, window // 2), window - 1)
    start = _bos(tokenizer) or [_doc_separator(tokenizer)]
    reqs, nbytes = [], 0
    for doc in docs:
        ids = start + encode_text(tokenizer, doc)
        nbytes += len(doc.encode("utf-8"))
        done = 1  # next position to score; position 0 is the start token
        while done < len(ids):
            end = min(done + stride, len(ids)) if done > 1 else min(window, len(ids))
            begin = max(0, end - window)
            reqs.append((ids[begin:done], ids[done:end]))
            done = end
    nats = -sum(score_continuations(model, tokenizer, reqs, batch_size))
    tokens = sum(len(c) for _, c in reqs)
    loss = nats / max(1, tokens)
    return {"task": "ppl", "docs": len(docs), "tokens": tokens, "bytes": nbytes, "loss": loss,
            "ppl": math.exp(min(loss, 700)), "bpb": nats / math.log(2) / max(1, nbytes),
            "window": window, "stride": stride}


# ---------------------------------------------------------------------------------------------
# Generation with exact match

def extract_answer(text: str, regex: str | None = None) -> str:
    """The final answer: --regex (last match, group 1 if any), else <answer>...</answer>, else the
    text after "####", else the last number, else the stripped text."""
    if regex:
        found = re.findall(regex, text, re.S)
        if not found:
            return ""
        last = found[-1]
        return (last[0] if isinstance(last, tuple) else last).strip()
    m = re.search(r"<answer>(.*?)(?:</answer>|$)", text, re.S)
    if m:
        text = m.group(1)
    if "####" in text:
        text = text.split("####")[-1]
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return nums[-1] if nums else text.strip()


def normalize_answer(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        f = float(s)
        return str(int(f)) if f == int(f) else repr(f)
    except (ValueError, OverflowError):
        return s.lower()


def evaluate_gen(model, tokenizer, data: str | None = None, shots: int = 0, limit: int | None = None,
                 regex: str | None = None, max_new_tokens: int = 256, batch_size: int = 8,
                 prompt_format: str = "auto", max_length: int | None = None) -> dict:
    """Greedy generation, exact match of the extracted answer, and <think>/<answer> format rate."""
    import torch

    items = load_gen(data)
    examples, items = items[:shots], items[shots:][:limit]
    if not items:
        raise ValueError(f"{data or 'bundled gen set'}: no questions left after {shots} few-shot examples")
    use_chat = prompt_format == "chat" or (prompt_format == "auto" and getattr(tokenizer, "chat_template", None))
    max_len = usable_length(model, tokenizer, max_length)
    prompts = []
    for it in items:
        if use_chat:
            msgs = []
            for ex in examples:
                msgs += [{"role": "user", "content": ex.question}, {"role": "assistant", "content": ex.solution}]
            msgs.append({"role": "user", "content": it.question})
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = render_prompt(tokenizer, msgs)  # question text never becomes a control token
        else:
            text = "".join(f"Question: {ex.question}\nAnswer: {ex.solution}\n\n" for ex in examples)
            text += f"Question: {it.question}\nAnswer:"
            ids = _bos(tokenizer) + encode_text(tokenizer, text)
        if len(ids) + 1 > max_len:
            raise ValueError(f"{it.source}: {shots}-shot prompt is {len(ids)} tokens but the model context is "
                             f"{max_len} tokens; use fewer --shots")
        prompts.append((text, ids))

    pad, dev = _pad_id(tokenizer), _device(model)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    strip = {t for t in (tokenizer.eos_token, tokenizer.pad_token, "<|im_end|>", "<|endoftext|>") if t}
    outputs: list[str] = [""] * len(items)
    for idx in _batches([len(p[1]) for p in prompts], batch_size, 1, 1):
        t = max(len(prompts[i][1]) for i in idx)
        ids = torch.full((len(idx), t), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            p = prompts[i][1]
            ids[r, t - len(p):], mask[r, t - len(p):] = torch.tensor(p), 1
        new = min(max_new_tokens, max_len - t)
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                                 do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for r, i in enumerate(idx):
            text = tokenizer.decode(gen[r, t:].tolist(), skip_special_tokens=False)
            for s in strip:
                text = text.split(s)[0] if s in ("<|im_end|>", tokenizer.eos_token) else text.replace(s, "")
            if not use_chat:
                text = text.split("\n\nQuestion:")[0]
            if prompts[i][0].rstrip().endswith("<think>"):
                text = "<think>" + text  # the template opened the think block
            outputs[i] = text
    rows, correct, well_formed = [], 0, 0
    for it, out in zip(items, outputs):
        pred = extract_answer(out, regex)
        ok = normalize_answer(pred) == normalize_answer(it.answer)
        fmt = bool(FORMAT_RE.match(out))
        correct, well_formed = correct + ok, well_formed + fmt
        rows.append({"question": it.question, "gold": it.answer, "pred": pred, "correct": ok,
                     "format_ok": fmt, "output": out})
    n = len(items)
    return {"task": "gen", "n": n, "shots": shots, "exact_match": correct / n, "format_rate": well_formed / n,
            "samples": rows}


def evaluate_reward(spec: str, data: str | None, limit: int | None = None, batch_size: int = 8,
                    max_length: int | None = None, device: str | None = None) -> dict:
    """Pairwise accuracy (ties half), mean margin and BT loss of a reward model on a preference file, with
    the accuracy of "the longer answer wins" beside it. Special-token strings in the pairs stay text except
    <answer>/</answer> (the bundled reasoning data's setting)."""
    import torch

    from tinylm.posttrain.dpo import load_pairs
    from tinylm.posttrain.reward import length_baseline_accuracy, load_reward_model, pair_metrics

    if not data:
        raise ValueError("--task reward needs --data PAIRS (prompt/chosen/rejected, any format DPO reads)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_reward_model(spec, device)
    pairs = load_pairs(data, tok, max_length or 512, allow_special_tokens=["<answer>", "</answer>"])[:limit]
    m = pair_metrics(model, pairs, tok.pad_token_id if tok.pad_token_id is not None else 0, batch_size)
    return {"n": len(pairs), "accuracy": m["accuracy"], "margin": m["margin"], "loss": m["loss"],
            "length_baseline": length_baseline_accuracy(pairs), "model": spec, "lora": None}


# ---------------------------------------------------------------------------------------------
# Several models, one table

def format_table(task: str, results: dict[str, dict]) -> str:
    """Markdown comparison table (models as columns for benchmarks, rows for ppl / gen)."""
    names = list(results)
    if task == "ppl":
        lines = ["| model | tokens | loss | perplexity | bits/byte |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {m} | {r['tokens']} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['bpb']:.4f} |"
                  for m, r in results.items()]
        return "\n".join(lines)
    if task == "reward":
        lines = ["| model | pairs | accuracy % | length-only baseline % | mean margin |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {m} | {r['n']} | {100 * r['accuracy']:.1f} | {100 * r['length_baseline']:.1f} | "
                  f"{r['margin']:.4f} |" for m, r in results.items()]
        return "\n".join(lines)
    if task == "gen":
        lines = ["| model | n | exact match % | think/answer format % |", "|---|---:|---:|---:|"]
        lines += [f"| {m} | {r['n']} | {100 * r['exact_match']:.1f} | {100 * r['format_rate']:.1f} |"
                  for m, r in results.items()]
        return "\n".join(lines)
    first = results[names[0]]
    lines = ["| subject | n | random % | " + " | ".join(f"{m} %" for m in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for s, v in first["subjects"].items():
        accs = " | ".join(f"{100 * results[m]['subjects'][s]['acc']:.1f}" for m in names)
        lines.append(f"| {s} | {v['n']} | {100 * v['random']:.1f} | {accs} |")
    accs = " | ".join(f"**{100 * results[m]['acc']:.1f}**" for m in names)
    lines.append(f"| **overall** | {first['n']} | {100 * first['random']:.1f} | {accs} |")
    if len(first["subjects"]) > 1:
        macro = " | ".join(f"{100 * results[m]['macro_acc']:.1f}" for m in names)
        lines.append(f"| subject average | {len(first['subjects'])} subj. | | {macro} |")
    return "\n".join(lines)


def run_eval(models: list[str], task: str, data: str | None = None, shots: int = 0, limit: int | None = None,
             lora: list[str] | None = None, scoring: str = "letter", split: str | None = None,
             batch_size: int = 8, max_length: int | None = None, stride: int | None = None,
             regex: str | None = None, max_new_tokens: int = 256, prompt_format: str = "auto",
             device: str | None = None, dtype: str | None = None) -> dict:
    """Evaluate each model spec on one task; returns {"task", ..., "models": {name: result}}."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    lora = list(lora or [])
    if len(lora) not in (0, 1, len(models)):
        raise ValueError(f"--lora takes one adapter for all models or one per model ('-' for none); "
                         f"got {len(lora)} for {len(models)} models")
    adapters = lora * len(models) if len(lora) == 1 else lora or [None] * len(models)
    results: dict[str, dict] = {}
    for spec, adapter in zip(models, adapters):
        adapter = None if adapter in (None, "-", "none") else adapter
        name = Path(spec).name if Path(spec).exists() else spec
        name = f"{name}+{Path(adapter).name}" if adapter else name
        while name in results:
            name += "'"
        if task == "reward":  # a reward model dir (stage reward): pairwise accuracy on preference pairs
            results[name] = evaluate_reward(spec, data, limit, batch_size, max_length, device)
            continue
        if task == "gen" and Path(spec, "vlm_config.json").is_file():  # image rows (tinylm/evaluation/vlm_eval.py)
            from tinylm.evaluation.vlm_eval import evaluate_vqa
            results[name] = evaluate_vqa(spec, data, limit, min(max_new_tokens, 32), batch_size)
            continue
        model, tok = load_for_eval(spec, adapter, device, dtype)
        if task == "ppl":
            r = evaluate_ppl(model, tok, data, limit, max_length, stride, batch_size)
        elif task == "gen":
            r = evaluate_gen(model, tok, data, shots, limit, regex, max_new_tokens, batch_size,
                             prompt_format, max_length)
        else:
            r = evaluate_mcq(model, tok, task, data, shots, limit, scoring, split, batch_size, max_length)
        r["model"], r["lora"] = spec, adapter
        results[name] = r
        del model
    return {"task": task, "data": data or "bundled sample", "shots": shots, "models": results}


def _cmd_eval(args: argparse.Namespace) -> int:
    out = run_eval(args.models, args.task, args.data, args.shots, args.limit, args.lora, args.scoring,
                   args.split, args.batch_size, args.max_length, args.stride, args.regex, args.max_new_tokens,
                   args.prompt_format, args.device, args.dtype)
    print(f"task {out['task']}  data {out['data']}  shots {out['shots']}"
          + (f"  scoring {args.scoring}" if args.task not in ("ppl", "gen", "reward") else ""))
    print(format_table(args.task, out["models"]))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(out, ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate models: ppl, ceval, cmmlu, mmlu, mcq, gen (local files)",
                       description="Evaluate one or more models on a local benchmark; see docs/eval.md. "
                                   "--task reward: reward models (stage reward) on --data preference pairs.")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="model dirs (tinylm or any HF causal LM) or presets")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", help="local file or folder in the official layout (default: bundled sample)")
    p.add_argument("--split", help="split to evaluate (default: val for C-Eval, test otherwise)")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples (dev split; first k of the file for gen)")
    p.add_argument("--limit", type=int, help="questions per subject (documents for ppl, questions for gen)")
    p.add_argument("--lora", nargs="+", metavar="DIR", help="LoRA adapter for all models, or one per model ('-' = none)")
    p.add_argument("--scoring", choices=("letter", "option"), default="letter",
                   help="letter: log-prob of the answer letter; option: length-normalised option log-likelihood")
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="context length (default: the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, help="ppl sliding-window stride (default: half the context)")
    p.add_argument("--regex", help="gen: regex whose last match (group 1) is the answer")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--prompt-format", choices=("auto", "chat", "plain"), default="auto",
                   help="gen: chat template (auto = when the tokenizer has one) or plain Question/Answer")
    p.add_argument("--device", help="cpu, cuda, mps (default: cuda if available)")
    p.add_argument("--dtype", help="fp32, bf16, fp16 (default: as saved)")
    p.set_defaults(func=_cmd_eval)
