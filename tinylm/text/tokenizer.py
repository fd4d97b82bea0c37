"""Byte-level BPE tokenizer: train one on your corpus, or use the bundled 6400-token one.

Why byte-level BPE (GPT-2, Radford et al. 2019; BPE for NMT, Sennrich et al. 2016): every string
is a byte sequence, so there is no unknown token and decode(encode(x)) == x exactly, for Chinese,
emoji, code and odd whitespace alike. We apply NO normalisation (not even NFC) so the round trip is
exact byte for byte. A small vocabulary (6400, as in MiniMind) keeps the embedding table of a
4.8M-parameter model small; most common Chinese characters become single tokens, frequent English
words and sub-words are merged.

Training streams: `iter_texts` is a generator that reads one jsonl line / a few KB of a text
file at a time and feeds HF `tokenizers`' `train_from_iterator`, so memory stays bounded by the
word-count table, not by the corpus size.

The saved directory is a plain transformers tokenizer (tokenizer.json + tokenizer_config.json with
the ChatML chat template, eos `<|im_end|>`, pad `<|endoftext|>`): `AutoTokenizer.from_pretrained`
loads it without tinylm installed.

    tinylm tokenizer train --input data/pretrain/train.jsonl --vocab-size 6400 --out runs/tok
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable, Iterator

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizer")

# Fixed ids 0..8: models, data tools and the chat template rely on these.
SPECIAL_TOKENS = [
    "<|endoftext|>",  # 0: document separator in pretraining, padding
    "<|im_start|>",   # 1: start of a chat turn
    "<|im_end|>",     # 2: end of a chat turn (eos)
    "<think>",        # 3: reasoning block
    "</think>",       # 4
    "<answer>",       # 5: final answer block (reasoning / GRPO)
    "</answer>",      # 6
    "<tool_call>",    # 7: tool call block
    "</tool_call>",   # 8
]

# ChatML. An assistant message with `reasoning_content` renders it first, inside <think>...</think>.
# No default system prompt is added. `add_generation_prompt` opens an assistant turn.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined"
    " and message['reasoning_content'] %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' }}"
    "{%- endif %}"
    "{{- (message['content'] if message['content'] is string else '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_MAX_LENGTH = 32768
_BLOCK_CHARS = 8192  # plain-text files are streamed in blocks of about this many characters


# ----------------------------------------------------------------------------- streaming input

def _record_texts(rec: object, where: str) -> list[str]:
    """The trainable strings of one jsonl/json record (pretraining, chat, alpaca, prompt/completion)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("text"), str):
        return [rec["text"]]
    msgs = rec.get("messages", rec.get("conversations"))
    if isinstance(msgs, list):
        out = []
        for m in msgs:  # "role\ncontent", so role names used by the chat template become tokens
            if isinstance(m, dict):
                role = m.get("role", m.get("from", ""))
                out += [f"{role}\n{m[k]}" for k in ("reasoning_content", "content") if isinstance(m.get(k), str)]
        return out
    keys = [k for k in ("instruction", "input", "output", "prompt", "completion", "chosen", "rejected")
            if isinstance(rec.get(k), str)]
    if keys:
        return [rec[k] for k in keys]
    raise ValueError(f"{where}: no trainable field (expected 'text', 'messages', 'conversations', "
                     f"'instruction'/'output' or 'prompt'/'completion'); keys: {sorted(rec)[:8]}")


def iter_texts(paths: Iterable[str], max_chars: int | None = None) -> Iterator[str]:
    """Stream training text from .jsonl / .json / plain-text files, one record or block at a time.

    .jsonl: one JSON object per line (field `text`, or chat/alpaca fields).
    .json : a JSON array of such objects (read whole: use .jsonl for big corpora).
    other : plain UTF-8 text, yielded in blocks of ~8 KB cut at line ends.
    Stops after `max_chars` characters when given (train on a prefix of a huge corpus).
    """
    paths = list(paths)
    for p in paths:  # fail fast, before a long training run starts
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tokenizer input not found: {p}")
    seen = 0
    for p in paths:
        for text in _iter_file(p):
            if not text:
                continue
            yield text
            seen += len(text)
            if max_chars is not None and seen >= max_chars:
                return


def _iter_file(path: str) -> Iterator[str]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                yield from _record_texts(rec, f"{path}:{i}")
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, rec in enumerate(data if isinstance(data, list) else [data]):
            yield from _record_texts(rec, f"{path}[{i}]")
    else:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            block: list[str] = []
            size = 0
            for line in f:
                block.append(line)
                size += len(line)
                if size >= _BLOCK_CHARS:
                    yield "".join(block)
                    block, size = [], 0
            if block:
                yield "".join(block)


# ----------------------------------------------------------------------------- training / loading

def _new_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    # GPT-2 regex split + bytes -> printable unicode; no prefix space so round trips are exact
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def wrap_tokenizer(tok, model_max_length: int = DEFAULT_MAX_LENGTH):
    """A `tokenizers.Tokenizer` -> transformers `PreTrainedTokenizerFast` with our specials + template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # HF's clean-up would break exact round trips
        chat_template=CHATML_TEMPLATE,
    )


def make_tokenizer_config_portable(out_dir: str | os.PathLike, chat_template: str | None = None,
                                   extra: dict | None = None) -> None:
    """Rewrite `out_dir/tokenizer_config.json` so every reader finds everything in that one file.

    transformers 5.x's save_pretrained keeps the chat template in chat_template.jinja, writes
    `tokenizer_class: TokenizersBackend` and a list under `extra_special_tokens`, and leaks loader
    flags (`is_local`, `local_files_only`). transformers 4.x, llama.cpp's converter and serving
    stacks expect the template inside tokenizer_config.json, a real class name and
    `additional_special_tokens`. The tokenizer's own template is kept unless `chat_template` is given.
    """
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    elif os.path.exists(jinja) and not cfg.get("chat_template"):
        with open(jinja, encoding="utf-8") as f:
            cfg["chat_template"] = f.read()
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra_special = cfg.pop("extra_special_tokens", None)
    if isinstance(extra_special, list) and "additional_special_tokens" not in cfg:
        cfg["additional_special_tokens"] = extra_special
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    cfg.update(extra or {})
    tmp = cfg_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, cfg_path)
    if os.path.exists(jinja) and cfg.get("chat_template"):  # one source of truth: the config
        os.remove(jinja)


def save_pretrained_portable(hf_tok, out_dir: str | os.PathLike) -> None:
    """Any tokenizer's save_pretrained + `make_tokenizer_config_portable` (its own chat template kept)."""
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(str(out_dir))
    make_tokenizer_config_portable(out_dir)


def save_tokenizer(hf_tok, out_dir: str) -> None:
    """Save tinylm's tokenizer: save_pretrained, then tokenizer_config.json holds the ChatML template,
    the think/answer/tool special tokens and no tokenization-space clean-up (exact round trips)."""
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    make_tokenizer_config_portable(out_dir, CHATML_TEMPLATE, {
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")]})


def train_tokenizer(inputs: list[str] | Iterable[str], vocab_size: int, out_dir: str | None,
                    min_frequency: int = 2, *, from_texts: bool = False, max_chars: int | None = None,
                    model_max_length: int = DEFAULT_MAX_LENGTH, show_progress: bool = False):
    """Train a byte-level BPE tokenizer and save it to `out_dir` (skipped when None).

    inputs: file paths (.jsonl/.json/.txt), streamed; or, with from_texts=True, any iterable of
    strings (consumed lazily, e.g. a generator). Special tokens get ids 0..8.
    Returns the transformers `PreTrainedTokenizerFast`.
    """
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    texts = iter(inputs) if from_texts else iter_texts(inputs, max_chars=max_chars)
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is unknown
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}"
    hf_tok = wrap_tokenizer(tok, model_max_length)
    if out_dir:
        save_tokenizer(hf_tok, out_dir)
    return hf_tok


def load_tokenizer(path: str | None = None):
    """Load a tokenizer directory (None -> the bundled 6400-token tokenizer)."""
    from transformers import AutoTokenizer

    path = path or BUNDLED_DIR
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer at {path} (expected a directory with tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(path)


def compression(tokenizer, text: str) -> float:
    """UTF-8 bytes per token (higher = better compression). Works for HF and `tokenizers` objects."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # fast path, no max-length warning
    enc = backend.encode(text, add_special_tokens=False)
    n = len(enc.ids) if hasattr(enc, "ids") else len(enc)
    return len(text.encode("utf-8")) / max(1, n)


# ----------------------------------------------------------------------------- CLI

def _cmd_train(args: argparse.Namespace) -> int:
    for p in args.input:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--input file not found: {p}")
    total = sum(os.path.getsize(p) for p in args.input)
    print(f"training byte-level BPE: vocab {args.vocab_size}, min_frequency {args.min_frequency}, "
          f"{len(args.input)} file(s), {total / 1e6:.1f} MB")
    t0 = time.time()
    max_chars = int(args.max_chars) if args.max_chars else None
    tok = train_tokenizer(args.input, args.vocab_size, args.out, args.min_frequency,
                          max_chars=max_chars, show_progress=not args.quiet)
    print(f"trained {len(tok)} tokens in {time.time() - t0:.1f}s -> {args.out}")
    # compression on the first ~200 KB of each input (training text: an optimistic estimate)
    for p in args.input:
        sample = "".join(_take_chars(iter_texts([p]), 200_000))
        print(f"  {p}: {compression(tok, sample):.2f} bytes/token")
    print(f"load it with: AutoTokenizer.from_pretrained({args.out!r})")
    return 0


def _take_chars(texts: Iterator[str], n: int) -> Iterator[str]:
    seen = 0
    for t in texts:
        yield t
        seen += len(t)
        if seen >= n:
            return


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a tokenizer on .jsonl/.json/.txt files (streamed)")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="training files: .jsonl ({'text'} or chat/alpaca records), .json array, or plain text")
    t.add_argument("--vocab-size", type=int, default=6400)
    t.add_argument("--out", required=True, help="output directory (loadable by AutoTokenizer)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    t.add_argument("--max-chars", type=float, default=None, help="train on at most this many characters")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)
