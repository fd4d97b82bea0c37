"""Tokenizer tests: exact round trips, fixed special ids, ChatML rendering through plain
transformers, streaming training, the CLI, and the bundled demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tinylm.text.tokenizer import (
    BUNDLED_DIR,
    SPECIAL_TOKENS,
    compression,
    iter_texts,
    load_tokenizer,
    train_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")

CASES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "混合 mixed 文本 text, 数字 12345 and 标点！？",
    "emoji 😀👍🏽 🇨🇳 👨‍👩‍👧 ✓",
    "def f(x):\n\treturn {'a': x ** 2}  # comment\n",
    "   leading spaces,   runs   of spaces\t\ttabs\n\n\n\nnewlines \r\n crlf  ",
    "e\u0301 vs \u00e9 (NFD vs NFC must survive), ﬁ ligature, full-width ＡＢＣ",
    "\x00\x01 control bytes and a lone \\ backslash",
    "",
]


@pytest.fixture(scope="module")
def bundled():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    jl = d / "a.jsonl"
    with open(jl, "w", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"zebrafinch 斑马雀 number {i} sings at dawn."}, ensure_ascii=False) + "\n")
        for i in range(50):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    txt = d / "b.txt"
    txt.write_text("".join(f"quokkaland line {i}\n\tindented 企鹅岛\n" for i in range(200)), encoding="utf-8")
    return str(jl), str(txt)


@pytest.fixture(scope="module")
def fresh(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(list(corpus), vocab_size=400, out_dir=str(out), min_frequency=2), str(out)


@pytest.mark.parametrize("text", CASES)
def test_round_trip_bundled(bundled, text):
    ids = bundled.encode(text, add_special_tokens=False)
    assert bundled.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # plain text never produces special ids


@pytest.mark.parametrize("text", CASES)
def test_round_trip_fresh(fresh, text):
    tok, _ = fresh
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_fixed_ids(bundled, fresh):
    for tok in (bundled, fresh[0]):
        for i, t in enumerate(SPECIAL_TOKENS):
            assert tok.convert_tokens_to_ids(t) == i
            assert tok.encode(t, add_special_tokens=False) == [i], t
        assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
        assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
        assert tok.decode([1, 2, 3], skip_special_tokens=True) == ""
    assert len(bundled) == 6400


def test_chat_template_exact(bundled):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "2+2?"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen = tok.apply_chat_template(msgs[1:3], tokenize=False)
    assert no_gen == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
    reason = [{"role": "user", "content": "q"},
              {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"}]
    assert tok.apply_chat_template(reason, tokenize=False) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n2+2=4\n</think>\n4<|im_end|>\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 4 and ids.count(1) == 5


def test_loads_without_tinylm(tmp_path):
    """The shipped directory is a plain transformers tokenizer: block `import tinylm` and load it."""
    code = (
        "import sys; sys.modules['tinylm'] = None\n"
        "from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({BUNDLED_DIR!r})\n"
        "m = [{'role': 'user', 'content': 'hi'}]\n"
        "print(t.apply_chat_template(m, tokenize=False, add_generation_prompt=True), end='')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_training_streams_lazily():
    pulled = []

    def gen():
        for i in range(300):
            pulled.append(i)
            yield f"streamed sample {i} 流式 {i % 7}\n"

    g = gen()
    tok = train_tokenizer(g, vocab_size=300, out_dir=None, from_texts=True)
    assert len(pulled) == 300  # consumed by the trainer, not materialised beforehand by us
    assert tok.decode(tok.encode("streamed 流式")) == "streamed 流式"


def test_iter_texts_streams_and_reports_bad_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "one"}\n{"text": "two"}\n{not json}\n', encoding="utf-8")
    it = iter_texts([str(p)])
    assert next(it) == "one" and next(it) == "two"  # records arrive before the bad line is read
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        next(it)
    q = tmp_path / "nofield.jsonl"
    q.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1: no trainable field"):
        list(iter_texts([str(q)]))
    big = tmp_path / "big.txt"
    content = "".join(f"line {i} 行\n" for i in range(20000))
    big.write_text(content, encoding="utf-8")
    blocks = list(iter_texts([str(big)]))
    assert len(blocks) > 10 and max(map(len, blocks)) < 9000 and "".join(blocks) == content


def test_jsonl_and_txt_mix(fresh, corpus):
    tok, out = fresh
    # words frequent only in the jsonl, only in the txt, and a chat role all became single tokens
    for word in ("zebrafinch", "quokkaland", "assistant"):
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))
    assert sorted(os.listdir(out)) >= ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.load(open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8"))
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert "<|im_start|>" in cfg["chat_template"] and cfg["model_max_length"] > 0


def test_compression(bundled):
    en = open(os.path.join(DATA, "pretrain", "heldout_en.txt"), encoding="utf-8").read()
    zh = open(os.path.join(DATA, "pretrain", "heldout_zh.txt"), encoding="utf-8").read()
    assert 2.5 < compression(bundled, en) < 6
    assert 2.5 < compression(bundled, zh) < 6  # ~1 Chinese character (3 bytes) per token
    assert compression(bundled, "aaaa") > 1


def _cli_main():
    try:
        from tinylm.cli import build_parser, main

        build_parser()  # all command modules importable?
        return main
    except ModuleNotFoundError:  # other modules of the tree not there yet: use ours alone
        import argparse

        from tinylm.text.tokenizer import add_cli

        def main(argv):
            p = argparse.ArgumentParser(prog="tinylm")
            add_cli(p.add_subparsers(dest="command", required=True))
            args = p.parse_args(argv)
            try:
                return args.func(args)
            except (FileNotFoundError, ValueError) as e:
                print(f"tinylm {args.command}: error: {e}", file=sys.stderr)
                return 2

        return main


def test_cli_train(corpus, tmp_path, capsys):
    main = _cli_main()
    out = tmp_path / "cli_tok"
    rc = main(["tokenizer", "train", "--input", *corpus, "--vocab-size", "350", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and "trained 350 tokens" in printed
    tok = load_tokenizer(str(out))
    assert tok.decode(tok.encode("企鹅岛 quokkaland")) == "企鹅岛 quokkaland"


def test_cli_missing_input(tmp_path, capsys):
    main = _cli_main()
    missing = str(tmp_path / "nope.jsonl")
    rc = main(["tokenizer", "train", "--input", missing, "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "not found" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train_tokenizer([missing], 300, None)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "no_such_dir"))


def test_bundled_data():
    def rows(p):
        with open(os.path.join(DATA, p), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    train = rows("pretrain/train.jsonl")
    assert len(train) > 500 and all(isinstance(r["text"], str) and r["text"] for r in train)
    n_zh = sum(any("\u4e00" <= c <= "\u9fff" for c in r["text"][:200]) for r in train)
    assert 0.2 < n_zh / len(train) < 0.8  # both languages present
    sft = rows("sft/train.jsonl")
    users = {m["content"] for r in sft for m in r["messages"] if m["role"] == "user"}
    for r in sft[:200]:
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles[0] == "user" and roles[-1] == "assistant"
    held = rows("sft/heldout_prompts.jsonl")
    assert held and all(h["expect"] == "tinylm" and h["prompt"] not in users for h in held)
    alpaca = json.load(open(os.path.join(DATA, "alpaca", "alpaca_demo.json"), encoding="utf-8"))
    assert len(alpaca) >= 200 and any(r["input"] for r in alpaca)
    assert all(set(r) == {"instruction", "input", "output"} for r in alpaca)
