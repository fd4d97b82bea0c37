"""`tinylm chat` (talk to a model in the terminal) and `tinylm generate` (batch-answer a prompt file).

`chat` is a multi-turn loop: the whole conversation is re-rendered with the chat template each turn
and the oldest turns (a user message with its answer, never half of one) are dropped when it no
longer fits the context window (with room left for the answer); `--yarn-factor` widens that window. Answers stream token by token; for reasoning models the `<think>` part is hidden unless
`--show-thinking`. Commands: `/reset`, `/system TEXT`, `/exit`. `--prompt` answers once and exits.

`generate` is black-box distillation (Hinton et al. 2015; as in Alpaca / MiniMind): a teacher
answers a prompt file, batched with continuous batching, and the answers become SFT data rows
`{"messages": [..., {"role": "assistant", "content": ...}]}`.

    tinylm chat runs/sft --system "You are a helpful assistant."
    tinylm chat runs/sft --prompt "Why is the sky blue?" --temperature 0
    tinylm generate --model runs/teacher --prompts prompts.jsonl --out distill.jsonl --n 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tinylm.inference.generate import SamplingParams


def load_for_inference(spec: str, lora: str | None = None, dtype: str | None = "auto", device: str | None = None,
                       tokenizer: str | None = None, yarn_factor: float = 1.0, quantize: str | None = None):
    """(model in eval mode, tokenizer), with an optional LoRA adapter and YaRN context extension applied;
    quantize="int8" decodes with weight-only int8 products (tinylm.inference.fast_decode)."""
    import torch

    from tinylm.models.loading import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(spec, dtype=dtype, device=device, tokenizer=tokenizer)
    if lora:
        try:
            from tinylm.models.lora import load_adapter
        except ImportError:
            raise ValueError("--lora needs the tinylm.models.lora module, which is not available in this install") from None
        if not os.path.isdir(lora):
            raise FileNotFoundError(f"{lora}: LoRA adapter directory not found")
        model = load_adapter(model, lora) or model
    enable_yarn(model, yarn_factor)
    if quantize and quantize != "none":
        from tinylm.inference import fast_decode

        fast_decode.require_quantizable(model, quantize)
    return model.eval(), tok


def load_draft(spec: str, target, tokenizer, dtype: str | None = "auto", device: str | None = None):
    """Load `--draft` and check that it shares the target's tokenizer (same vocabulary); `--draft mtp`:
    self-speculation with the target's own MTP module."""
    if spec == "mtp":
        if not getattr(target, "mtp", None):
            raise ValueError("--draft mtp: the model has no MTP modules (train it with mtp_depth >= 1)")
        return "mtp"

    draft, draft_tok = load_for_inference(spec, None, dtype, device)
    if draft_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--draft {spec}: its tokenizer differs from the target's (speculative decoding "
                         "needs the same token ids)")
    from tinylm.inference.speculative import check_pair

    check_pair(target, draft)
    return draft


def enable_yarn(model, factor: float):
    """Run a tinylm model at `factor` x its trained context with YaRN (inference only); returns it.

    The trained length becomes `yarn_original_max_position` (kept if the model already uses YaRN,
    e.g. one imported from transformers). Factor 1 leaves the model unchanged.
    """
    if factor == 1.0:
        return model
    if factor < 1.0:
        raise ValueError(f"--yarn-factor must be >= 1, got {factor}")
    from tinylm.inference.generate import is_tinylm

    if not is_tinylm(model):
        raise ValueError("--yarn-factor works for tinylm models; for a transformers model set "
                         "rope_scaling / rope_parameters in its config.json")
    cfg = model.config
    if cfg.yarn_factor <= 1.0:
        cfg.yarn_original_max_position = cfg.max_position_embeddings
    cfg.yarn_factor = float(factor)
    for m in model.modules():  # RoPE frequencies are cached on first use
        if hasattr(m, "_rope_cache"):
            m._rope_cache = None
    return model


def fit_history(tokenizer, messages: list[dict], context: int, max_new_tokens: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest turns until prompt + answer fit in the context; return (messages, ids).

    A turn is a user message with everything up to the next user message (its answer), dropped
    whole: dropping one message at a time could leave the history starting with an orphan
    assistant answer. System messages and the last user turn are always kept.
    """
    from tinylm.inference.generate import render_chat

    messages = list(messages)
    while True:
        ids = render_chat(tokenizer, messages)
        if len(ids) + min(max_new_tokens, 64) <= context:  # keep at least some room for the answer
            return messages, ids
        first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        end = None if first is None else next(
            (j for j in range(first + 1, len(messages)) if messages[j]["role"] == "user"), None)
        if end is None:
            raise ValueError(f"the message is too long: {len(ids)} tokens, context is {context}")
        del messages[first:end]


# ---------------------------------------------------------------------------------------------
# tinylm chat
# ---------------------------------------------------------------------------------------------
def _answer(gen, tokenizer, messages: list[dict], params: SamplingParams, show_thinking: bool, out=None,
            ) -> tuple[list[dict], str, str]:
    """Stream one reply to `out` (default: the current sys.stdout); return (trimmed history, content, reasoning)."""
    from dataclasses import replace

    from tinylm.inference.generate import stream

    out = out or sys.stdout
    messages, ids = fit_history(tokenizer, messages, gen.max_seq_len, params.max_new_tokens)
    params = replace(params, max_new_tokens=min(params.max_new_tokens, gen.max_seq_len - len(ids)))
    dim, reset = ("\033[2m", "\033[0m") if out.isatty() else ("", "")
    content, reasoning, in_reasoning = [], [], False
    try:
        for d in stream(gen.model, tokenizer, ids, params, generator=gen):
            if d.reasoning:
                reasoning.append(d.reasoning)
                if show_thinking:
                    if not in_reasoning:
                        out.write(f"{dim}<think>\n")
                        in_reasoning = True
                    out.write(d.reasoning)
            if d.content:
                if in_reasoning:
                    out.write(f"\n</think>{reset}\n")
                    in_reasoning = False
                content.append(d.content)
                out.write(d.content)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    if in_reasoning:
        out.write(f"\n</think>{reset}")
    out.write("\n")
    out.flush()
    return messages, "".join(content), "".join(reasoning)


def _cmd_chat(args: argparse.Namespace) -> int:
    from tinylm.inference.generate import BatchGenerator
    from tinylm.models.vision import is_vlm_dir

    if is_vlm_dir(args.model_dir):  # a vision-language model: tinylm/inference/vlm_chat.py
        from tinylm.inference.vlm_chat import chat_vlm
        return chat_vlm(args)
    if args.image:
        raise ValueError(f"--image: {args.model_dir} is not a vision-language model (no vlm_config.json)")
    params = SamplingParams.from_args(args)
    set_compile_mode(args.compile)
    model, tok = load_for_inference(args.model_dir, args.lora, args.dtype, args.device, args.tokenizer,
                                    yarn_factor=args.yarn_factor, quantize=args.quantize)
    if args.tools:  # ReAct loop with the bundled tools (tinylm/inference/agent.py)
        from tinylm.inference.agent import chat_with_tools
        return chat_with_tools(model, tok, args)
    gen = BatchGenerator(model, tok, max_batch=1)
    system = args.system
    history: list[dict] = []

    def convo() -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + history

    if args.prompt is not None:
        history.append({"role": "user", "content": args.prompt})
        _answer(gen, tok, convo(), params, args.show_thinking)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"tinylm chat: {args.model_dir} (context {gen.max_seq_len} tokens). "
              "Commands: /reset, /system TEXT, /exit. Ctrl-C stops an answer.")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'removed'}; history cleared)")
            continue
        if text.startswith("/"):
            print("unknown command; use /reset, /system TEXT or /exit")
            continue
        history.append({"role": "user", "content": text})
        try:
            kept, content, _ = _answer(gen, tok, convo(), params, args.show_thinking)
        except ValueError as e:
            print(f"error: {e}")
            history.pop()
            continue
        history[:] = [m for m in kept if m["role"] != "system"] + [{"role": "assistant", "content": content}]
    return 0


# ---------------------------------------------------------------------------------------------
# tinylm generate
# ---------------------------------------------------------------------------------------------
def read_prompts(path: str, system: str | None = None) -> list[list[dict]]:
    """Conversations to answer from a jsonl of {"prompt": str} or {"messages": [...]} rows."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: prompt file not found")
    convos = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                msgs = [{"role": "user", "content": row["prompt"]}]
            elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
                msgs = row["messages"]
                if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in msgs):
                    raise ValueError(f"{path}:{n}: field 'messages' must be a list of {{role, content}} strings")
                if msgs[-1]["role"] == "assistant":  # the teacher writes its own answer
                    msgs = msgs[:-1]
                if not msgs:
                    raise ValueError(f"{path}:{n}: field 'messages' has no prompt before the assistant turn")
                msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
            else:
                raise ValueError(f"{path}:{n}: need a string field 'prompt' or a non-empty list field 'messages'")
            if system and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": system}] + msgs
            convos.append(msgs)
    if not convos:
        raise ValueError(f"{path}: no prompts")
    return convos


def _cmd_generate(args: argparse.Namespace) -> int:
    import time
    from dataclasses import replace

    from tinylm.inference.generate import generate
    from tinylm.models.vision import is_vlm_dir

    if is_vlm_dir(args.model):  # a vision-language model: rows may carry images (tinylm/inference/vlm_generate.py)
        from tinylm.inference.vlm_generate import generate_vlm_cmd
        return generate_vlm_cmd(args)
    if args.image:
        raise ValueError(f"--image: {args.model} is not a vision-language model (no vlm_config.json)")
    params = SamplingParams.from_args(args)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    convos = read_prompts(args.prompts, args.system)
    set_compile_mode(args.compile)
    model, tok = load_for_inference(args.model, args.lora, args.dtype, args.device, args.tokenizer,
                                    quantize=args.quantize)
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    jobs = [(c, k) for c in convos for k in range(args.n)]
    t0, n_tok, n_done, draft = time.time(), 0, 0, None
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(jobs), args.chunk):  # chunks keep memory bounded and show progress
            chunk = jobs[start:start + args.chunk]
            by_k: dict[int, list[int]] = {}
            for j, (_, k) in enumerate(chunk):
                by_k.setdefault(k, []).append(j)
            results: list = [None] * len(chunk)
            for k, idx in by_k.items():  # choice k of n uses seed + k
                p = replace(params, seed=None if params.seed is None else params.seed + k)
                if args.draft:  # speculative decoding (tinylm/inference/speculative.py), one prompt at a time
                    from tinylm.inference.speculative import generate_speculative

                    draft = draft or load_draft(args.draft, model, tok, args.dtype, args.device)
                    outs, st = generate_speculative(model, draft, tok, [chunk[j][0] for j in idx], p, args.draft_k)
                    print(f"speculative: acceptance {st.acceptance_rate:.2f}, {st.tokens_per_forward:.2f} "
                          "tokens per target forward", file=sys.stderr)
                else:
                    outs = generate(model, tok, [chunk[j][0] for j in idx], p, max_batch=args.batch_size, chat=True)
                for j, o in zip(idx, outs):
                    results[j] = o
            for (convo, _), o in zip(chunk, results):
                answer = {"role": "assistant", "content": o.text}
                if o.reasoning and args.keep_thinking:
                    answer["reasoning_content"] = o.reasoning
                f.write(json.dumps({"messages": convo + [answer]}, ensure_ascii=False) + "\n")
                n_tok += len(o.token_ids)
            n_done += len(chunk)
            print(f"{n_done}/{len(jobs)} answers, {n_tok / (time.time() - t0):.1f} tok/s", file=sys.stderr)
    os.replace(tmp, args.out)
    print(f"wrote {n_done} rows to {args.out}")
    return 0


def set_compile_mode(flag: bool | None) -> None:
    """--compile / --no-compile, else TINYLM_COMPILE_DECODE, else build the compiled decode step on
    first use (tinylm/inference/compiled_decode.py: once per machine and model shape, ~10 s)."""
    from tinylm.inference.compiled_decode import set_mode

    set_mode(flag, default="1")


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--lora", default=None, help="LoRA adapter directory to apply")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: cuda if available)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: decode with weight-only int8 products on CPU (~2-3x faster, logits within ~1%%)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU fp32/int8: decode through the ahead-of-time compiled step (1.3-2x the "
                        "eager step; built on first use, ~10 s once per machine and model shape, kept in "
                        "~/.cache/tinylm/decode; eager on any failure). Default: on, unless "
                        "TINYLM_COMPILE_DECODE says otherwise")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Multi-turn streaming chat. Commands: /reset, /system TEXT, /exit.")
    p.add_argument("model_dir", help="model directory or preset name")
    _add_sampling(p, temperature=0.7)
    p.add_argument("--prompt", default=None, help="answer this one message and exit (scriptable)")
    p.add_argument("--show-thinking", action="store_true", help="print the <think> part of reasoning models")
    p.add_argument("--tools", default=None, help="let the model call bundled tools: 'all' or a comma list "
                   "(calculator,convert_units,date_diff,date_add,lookup_country); docs/tools.md")
    p.add_argument("--max-turns", type=int, default=4, help="with --tools: model turns per answer")
    p.add_argument("--image", action="append", help="attach an image to the first message (vision models; "
                   "repeatable; /image PATH in the chat)")
    p.add_argument("--yarn-factor", type=float, default=1.0,
                   help="chat at this many times the trained context with YaRN (tinylm models, e.g. 4)")
    p.set_defaults(func=_cmd_chat)

    g = sub.add_parser("generate", help="answer a prompt file in batches (distillation data)",
                       description="Write {'messages': [..., assistant answer]} rows for every prompt.")
    g.add_argument("--model", required=True, help="teacher model directory or preset name")
    g.add_argument("--prompts", required=True, help='jsonl with {"prompt": ...} or {"messages": [...]} rows')
    g.add_argument("--out", required=True, help="output jsonl")
    g.add_argument("--n", type=int, default=1, help="answers per prompt (different seeds)")
    g.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    g.add_argument("--chunk", type=int, default=256, help="prompts per chunk (memory / progress)")
    g.add_argument("--keep-thinking", action="store_true", help="keep reasoning_content in the rows")
    g.add_argument("--draft", default=None, help="draft model (same tokenizer) for speculative decoding, or 'mtp' (the model's own MTP module)")
    g.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per target forward")
    g.add_argument("--image", action="append", help="attach this image to every prompt (vision models; repeatable; "
                   "rows may also name their own with \"image\")")
    _add_sampling(g, temperature=0.8)
    g.set_defaults(func=_cmd_generate)
