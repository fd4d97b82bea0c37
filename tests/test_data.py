"""Data pipeline: formats + validation, chat loss masks, prepare (packing, workers), dataset, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tinylm.data import prepare as prep
from tinylm.data.dataset import BatchIterator, TokenDataset, load_token_dataset
from tinylm.data.formats import DataError, ReadStats, detect_format, iter_records
from tinylm.text.chat_format import encode_chat, encode_preference, render_prompt

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>",
            "<tool_call>", "</tool_call>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("the quick brown fox jumps over a lazy dog while tiny models learn to talk and count "
         "numbers like 12 345 and write 你好 世界 in many small steps").split()


def make_tokenizer():
    """Byte-level BPE with the bundled special-token layout (ids 0..8) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = np.random.default_rng(0)
    tok.train_from_iterator([" ".join(rng.choice(WORDS, 30)) for _ in range(200)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return prep.get_tokenizer(tok_dir)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 60)))) for _ in range(n)]


def convs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
        m = [{"role": "system", "content": "be brief"}] if i % 2 else []
        for _ in range(1 + i % 3):
            m += [{"role": "user", "content": t(5)}, {"role": "assistant", "content": t(int(rng.integers(2, 20)))}]
        out.append({"messages": m})
    return out


# ----------------------------------------------------------------------------- formats

def test_detect_every_format(tmp_path):
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    cases = {
        "text": {"text": "once upon a time"},
        "messages": {"messages": [u, a]},
        "conversations": {"conversations": [u, a]},
        "alpaca": {"instruction": "add", "input": "1+1", "output": "2", "system": "math"},
        "prompt_completion": {"prompt": "2+2=", "completion": "4"},
        "preference": {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
        "chosen_rejected": {"chosen": [u, a], "rejected": [u, {"role": "assistant", "content": "no"}]},
    }
    for fmt, row in cases.items():
        p = write_jsonl(tmp_path / f"{fmt}.jsonl", [row])
        assert detect_format(p) == fmt
        (rec,) = iter_records(p)
        assert (rec.format, rec.source, rec.line) == (fmt, p, 1)
    # .json array (Alpaca) and .txt
    arr = tmp_path / "alpaca.json"
    arr.write_text(json.dumps([cases["alpaca"], {"instruction": "x", "output": "y"}], indent=2))
    assert detect_format(str(arr)) == "alpaca"
    recs = list(iter_records(str(arr)))
    assert recs[0].messages == [{"role": "system", "content": "math"}, {"role": "user", "content": "add\n\n1+1"},
                                {"role": "assistant", "content": "2"}]
    assert recs[1].line > recs[0].line > 1
    txt = tmp_path / "a.txt"
    txt.write_text("doc one\nline two\n<|endoftext|>\ndoc two\n")
    assert detect_format(str(txt)) == "txt"
    assert [r.text for r in iter_records(str(txt))] == ["doc one\nline two\n", "doc two\n"]
    # normalised shapes
    pc = next(iter_records(write_jsonl(tmp_path / "pc.jsonl", [cases["prompt_completion"]])))
    assert pc.messages == [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    mm = next(iter_records(write_jsonl(tmp_path / "cr.jsonl", [cases["chosen_rejected"]])))
    assert mm.prompt == [u] and mm.chosen == [a] and mm.rejected[0]["content"] == "no"


def test_reasoning_normalised(tmp_path, tok):
    inline = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "<think>\nadd them\n</think>\n4"}]}
    field = {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "reasoning_content": "add them"}]}
    r1, r2 = iter_records(write_jsonl(tmp_path / "r.jsonl", [inline, field]))
    assert r1.messages == r2.messages
    assert r1.messages[1] == {"role": "assistant", "content": "4", "reasoning_content": "add them"}
    ids, mask = encode_chat(tok, r1.messages)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "<think>\nadd them\n</think>\n4<|im_end|>"


BAD = [
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "bot", "content": "c"}]}',
     "field 'messages[2].role': must be one of system/user/assistant/tool, got 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}', "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "field 'messages': has no assistant turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}',
     "field 'messages[0].content': must be a string, got a number"),
    ('{"messages": [{"content": "a"}]}', "field 'messages[0].role': is missing"),
    ('{"messages": "hi"}', "field 'messages': must be a list"),
    ('{"text": "   "}', "field 'text': is empty"),
    ('{"text": ["a"]}', "field 'text': must be a string, got a list"),
    ('{"instruction": "do", "output": ""}', "field 'output': is empty"),
    ('{"prompt": "q", "chosen": "same", "rejected": "same"}', "field 'rejected': is identical to 'chosen'"),
    ('{"prompt": "q", "chosen": "", "rejected": "b"}', "field 'chosen': is empty"),
    ('{"foo": 1}', "unrecognised record"),
    ('[1, 2]', "expected a JSON object, got a list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>b", '
     '"reasoning_content": "y"}]}', "use only one"),
]


@pytest.mark.parametrize("line,msg", BAD)
def test_errors_name_file_line_field(tmp_path, line, msg):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    if '"text"' in line:
        good = {"text": "fine"}
    if '"prompt"' in line:
        good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    if '"instruction"' in line:
        good = {"instruction": "a", "output": "b"}
    p = write_jsonl(tmp_path / "x.jsonl", [good, good, line])
    with pytest.raises(DataError) as ei:
        list(iter_records(p))
    assert str(ei.value).startswith(f"{p}:3: ")
    assert msg in str(ei.value)
    assert ei.value.line == 3


def test_kind_mismatch_and_skip_invalid(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, "{bad json", {"text": ""},
                                           {"messages": [{"role": "user", "content": "q"}]}, {"text": "b"}])
    with pytest.raises(DataError, match=r"m.jsonl:2: invalid JSON"):
        list(iter_records(p))
    st = ReadStats()
    recs = list(iter_records(p, kind="pretrain", skip_invalid=True, stats=st))
    assert [r.text for r in recs] == ["a", "b"] and [r.line for r in recs] == [1, 5]
    assert st.n_invalid == 3 and [e.line for e in st.invalid] == [2, 3, 4]
    assert st.counts == {"text": 2}
    chat = write_jsonl(tmp_path / "c.jsonl", convs(1))
    with pytest.raises(DataError, match="c.jsonl:1: expected pretraining text"):
        list(iter_records(chat, kind="pretrain"))


# ----------------------------------------------------------------------------- chat encoding

def test_chat_mask_multi_turn(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"},
            {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": "and then"},
            {"role": "assistant", "content": "\n\na lazy dog 你好"}]
    ids, mask = encode_chat(tok, msgs)
    # ids are exactly the template's own tokenization
    ref = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == ref and len(mask) == len(ids)
    # trained spans = each assistant content + its <|im_end|>; nothing else (system/user/headers)
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    assert spans == ["jumps over<|im_end|>", "\n\na lazy dog 你好<|im_end|>"]
    # ChatML fast path == generic template-diff path, byte for byte
    import copy
    slow = copy.deepcopy(tok)
    slow._tinylm_is_chatml = (slow.chat_template, False)
    assert encode_chat(slow, msgs) == (ids, mask)
    # truncation
    assert encode_chat(tok, msgs, max_len=7) == (ids[:7], mask[:7])
    # preference: only the response is trained, earlier assistant turns are context
    pids, pmask = encode_preference(tok, msgs[:4], msgs[4:])
    assert pids == ids and tok.decode([i for i, m in zip(pids, pmask) if m]) == "\n\na lazy dog 你好<|im_end|>"
    # prompt rendering = HF apply_chat_template with the generation prompt
    want = tok.apply_chat_template(msgs[:4], tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert render_prompt(tok, msgs[:4]) == list(want) == ids[:len(want)]
    assert render_prompt(slow, msgs[:4]) == list(want)


# ----------------------------------------------------------------------------- prepare

def read_rows(d):
    ds = TokenDataset(d)
    return ds, [ds.row(i) for i in range(len(ds))]


def test_pretrain_packing_keeps_every_token(tmp_path, tok):
    texts = docs(60)
    p = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in texts])
    meta = prep.prepare([p], str(tmp_path / "out"), "pretrain", tok, seq_len=64, workers=1, log=lambda s: None)
    ds, rows = read_rows(str(tmp_path / "out"))
    eos = ds.eos_id
    assert eos == 0 and ds.tokens.dtype == np.uint16 and ds.mask is None
    assert all(len(r) == 64 for r, _ in rows[:-1]) and 0 < len(rows[-1][0]) <= 64
    expected = np.concatenate([np.array(prep.encode_text(tok, t) + [eos]) for t in texts])
    stream = np.concatenate([r for r, _ in rows])
    np.testing.assert_array_equal(stream, expected)  # no token lost, none added (no padding)
    assert int((stream == eos).sum()) == len(texts)  # one separator per document boundary
    assert meta["n_tokens"] == len(expected) and meta["records"] == {"text": 60}
    assert meta["last_row_tokens"] == len(expected) % 64
    # drop_remainder drops only the final partial row, and says so
    m2 = prep.prepare([p], str(tmp_path / "o2"), "pretrain", tok, seq_len=64, drop_remainder=True,
                      log=lambda s: None)
    assert m2["n_tokens"] == len(expected) // 64 * 64 and m2["dropped_remainder_tokens"] == len(expected) % 64


def test_workers_byte_identical(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 2000)  # many chunks in flight
    pre = write_jsonl(tmp_path / "pre.jsonl", [{"text": t} for t in docs(300)])
    sft = write_jsonl(tmp_path / "sft.jsonl", convs(150))
    for kind, path, extra in (("pretrain", pre, {}), ("sft", sft, {"pack": True})):
        outs = []
        for w in (1, 2):
            d = tmp_path / f"{kind}{w}"
            prep.prepare([path], str(d), kind, tok, seq_len=48, workers=w, val_fraction=0.1,
                         log=lambda s: None, **extra)
            outs.append(d)
        for name in ("tokens.bin", "offsets.npy", "mask.bin", "val/tokens.bin", "val/offsets.npy"):
            a, b = outs[0] / name, outs[1] / name
            assert a.exists() == b.exists()
            if a.exists():
                assert a.read_bytes() == b.read_bytes(), name


def test_sft_rows_masks_truncation_pack(tmp_path, tok):
    rows = convs(30)
    p = write_jsonl(tmp_path / "sft.jsonl", rows)
    meta = prep.prepare([p], str(tmp_path / "o"), "sft", tok, seq_len=40, log=lambda s: None)
    ds, got = read_rows(str(tmp_path / "o"))
    want = [encode_chat(tok, r["messages"]) for r in rows]
    n_trunc = sum(len(i) > 40 for i, _ in want)
    kept = [(i[:40], m[:40]) for i, m in want if any(m[:40])]
    assert meta["truncated"] == n_trunc > 0 and len(got) == len(kept) == meta["n_rows"]
    assert meta["dropped_no_target"] == len(want) - len(kept)
    for (gi, gm), (wi, wm) in zip(got, kept):
        assert gi.tolist() == wi and gm.tolist() == wm
    # labels: -100 exactly where the mask is 0
    item = ds[0]
    assert item["input_ids"].dtype == torch.int64
    assert ((item["labels"] != -100) == torch.from_numpy(got[0][1].astype(bool))).all()
    # packing: rows <= seq_len, same tokens, fewer rows
    one = prep.prepare([p], str(tmp_path / "o2"), "sft", tok, seq_len=200, log=lambda s: None)
    mp_ = prep.prepare([p], str(tmp_path / "pk"), "sft", tok, seq_len=200, pack=True, log=lambda s: None)
    _, got1 = read_rows(str(tmp_path / "o2"))
    _, got2 = read_rows(str(tmp_path / "pk"))
    assert all(len(i) <= 200 for i, _ in got2) and len(got2) < len(got1) == 30
    assert mp_["n_tokens"] == one["n_tokens"] and mp_["n_trained_tokens"] == one["n_trained_tokens"]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in got2]), np.concatenate([i for i, _ in got1]))
    # each packed conversation's first token is marked (mask bit 1); bit 0 is the unpacked loss mask
    np.testing.assert_array_equal(np.concatenate([m for _, m in got2]) & 1, np.concatenate([m for _, m in got1]))
    assert sum(int((m & 2 > 0).sum()) for _, m in got2) == 30 and all(m[0] & 2 for _, m in got2)


def test_packed_sft_loss_equals_unpacked(tmp_path, tok):
    """Packing changes speed, not the loss: positions restart and attention stays inside each
    conversation, so every token's loss is the same as in its own unpadded row."""
    from tinylm.data.dataset import collate
    from tinylm.models.config import TinyLMConfig
    from tinylm.models.model import TinyLMForCausalLM
    from tinylm.training.objectives import LMObjective
    from tinylm.training.trainconfig import TrainConfig

    p = write_jsonl(tmp_path / "sft.jsonl", convs(12, seed=3))
    prep.prepare([p], str(tmp_path / "one"), "sft", tok, seq_len=256, log=lambda s: None)
    prep.prepare([p], str(tmp_path / "pk"), "sft", tok, seq_len=256, pack=True, log=lambda s: None)
    one, pk = TokenDataset(str(tmp_path / "one")), TokenDataset(str(tmp_path / "pk"))
    assert len(pk) < len(one)
    torch.manual_seed(0)
    model = TinyLMForCausalLM(TinyLMConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=256)).eval()
    obj = LMObjective(TrainConfig())
    with torch.no_grad():
        total_one = sum(float(obj.loss(model, collate(one, [i]))[0]) for i in range(len(one)))
        packed = collate(pk, list(range(len(pk))))  # all packed rows in one right-padded batch
        assert "position_ids" in packed and int((packed["position_ids"] == 0).sum()) >= 12
        loss_pk, n_pk, _ = obj.loss(model, packed)
        plain = {k: v for k, v in packed.items() if k != "position_ids"}  # without the restarts...
        loss_leaky, _, _ = obj.loss(model, plain)
    assert int(n_pk) == sum(int(one[i]["labels"][1:].ne(-100).sum()) for i in range(len(one)))
    assert float(loss_pk) == pytest.approx(total_one, rel=1e-5)
    # ...conversations would see each other: a difference far above the packed path's rounding
    assert abs(float(loss_leaky) - total_one) > 20 * abs(float(loss_pk) - total_one) + 1e-4 * total_one


# ----------------------------------------------------------------------------- batches

@pytest.fixture(scope="module")
def sft_ds(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("sftds")
    p = write_jsonl(d / "s.jsonl", convs(53, seed=3))
    prep.prepare([p], str(d / "out"), "sft", tok, seq_len=64, log=lambda s: None)
    return TokenDataset(str(d / "out"))


def test_batch_padding_and_labels(sft_ds):
    it = BatchIterator(sft_ds, batch_size=4, seq_len=64, shuffle=False)
    b = it.next_batch()
    lens = sft_ds.lengths[:4]
    assert b["input_ids"].shape == (4, lens.max())
    for r in range(4):
        ids, m = sft_ds.row(r)
        n = len(ids)
        assert b["attention_mask"][r].tolist() == [1] * n + [0] * (lens.max() - n)
        assert b["input_ids"][r, :n].tolist() == ids.tolist()
        assert (b["labels"][r, n:] == -100).all()
        assert b["labels"][r, :n].tolist() == [i if k else -100 for i, k in zip(ids.tolist(), m.tolist())]
    assert b["n_tokens"] == int(lens.sum())
    assert b["n_targets"] == int((b["labels"][:, 1:] != -100).sum())


def test_batch_iterator_resume_identical(sft_ds):
    a = BatchIterator(sft_ds, batch_size=4, seq_len=64, seed=7)
    assert len(a) == 13
    ref = [a.next_batch()["input_ids"] for _ in range(30)]  # crosses two epoch boundaries
    b = BatchIterator(sft_ds, batch_size=4, seq_len=64, seed=7)
    for _ in range(17):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))  # survives a checkpoint round trip
    c = BatchIterator(sft_ds, batch_size=4, seq_len=64, seed=7)
    c.load_state_dict(state)
    for k in range(17, 30):
        assert torch.equal(c.next_batch()["input_ids"], ref[k])
    # new epoch -> new order
    o = a.order
    assert not np.array_equal(o(0), o(1)) and sorted(o(0).tolist()) == list(range(len(sft_ds)))


def test_two_rank_sharding_covers_global_batch(sft_ds):
    ranks = [BatchIterator(sft_ds, batch_size=3, seq_len=64, rank=r, world_size=2, seed=1) for r in range(2)]
    single = BatchIterator(sft_ds, batch_size=6, seq_len=64, seed=1)
    seen = []
    for step in range(len(single)):
        g = single.order(0)[step * 6:(step + 1) * 6]
        got = []
        for r, it in enumerate(ranks):
            b = it.next_batch()
            mine = g[r::2]
            got += mine.tolist()
            for j, row in enumerate(mine):
                ids, _ = sft_ds.row(int(row))
                assert b["input_ids"][j, :len(ids)].tolist() == ids.tolist()
        assert sorted(got) == sorted(g.tolist())
        seen += got
    assert len(seen) == len(set(seen)) == len(single) * 6  # disjoint, each row at most once per epoch


def test_load_token_dataset_cache(tmp_path, tok):
    p = write_jsonl(tmp_path / "c.jsonl", convs(12))
    cache = str(tmp_path / "cache")
    ds = load_token_dataset(p, tok, kind="sft", seq_len=64, cache_dir=cache)
    ds2 = load_token_dataset(p, tok, kind="sft", seq_len=64, cache_dir=cache)
    assert ds.dir == ds2.dir and len([f for f in os.listdir(cache) if not f.endswith(".lock")]) == 1
    assert len(ds) == 12
    ds3 = load_token_dataset(p, tok, kind="sft", seq_len=32, cache_dir=cache)
    assert ds3.dir != ds.dir  # seq_len is part of the key
    assert load_token_dataset(ds.dir, kind="sft").n_tokens == ds.n_tokens
    with pytest.raises(ValueError, match="prepared as 'sft'"):
        load_token_dataset(ds.dir, kind="pretrain")


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def cli(monkeypatch):
    from tinylm import cli as cli_mod
    monkeypatch.setattr(cli_mod, "COMMAND_MODULES", ["tinylm.data.prepare"])  # independent of other modules
    return cli_mod.main


def test_cli_check_and_prepare(tmp_path, tok_dir, cli, capsys):
    good = convs(5)
    p = write_jsonl(tmp_path / "d.jsonl", good[:2] + ['{"messages": [{"role": "bot", "content": "x"}]}'] + good[2:])
    assert cli(["data", "check", p, "--tokenizer", tok_dir, "--seq-len", "16"]) == 1
    out = capsys.readouterr().out
    assert "5 valid records (messages: 5), 1 invalid" in out
    assert f"{p}:3: field 'messages[0].role'" in out
    assert "chat tokens per record: min" in out and "p95" in out and "are longer -> truncated" in out
    out_dir = str(tmp_path / "prep")
    args = ["data", "prepare", "--input", p, "--out", out_dir, "--kind", "sft", "--tokenizer", tok_dir,
            "--seq-len", "64", "--workers", "1"]
    assert cli(args) == 2
    assert f"{p}:3: field 'messages[0].role'" in capsys.readouterr().err
    assert not [f for f in os.listdir(out_dir) if f.endswith(".tmp")]  # a failed run leaves no partial files
    assert cli(args + ["--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 invalid" in out and "MB/s" in out and "tokens/s" in out
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    assert meta["kind"] == "sft" and meta["n_rows"] == 5 and meta["invalid"] == 1 and meta["dtype"] == "uint16"
    assert meta["tokenizer"]["sha256"] == prep.tokenizer_fingerprint(prep.get_tokenizer(tok_dir))


def test_bundled_tokenizer_fast_path_matches_its_template():
    tk = pytest.importorskip("tinylm.text.tokenizer")
    try:
        tok = tk.load_tokenizer()
    except Exception as e:  # pragma: no cover - bundled tokenizer not built yet
        pytest.skip(f"bundled tokenizer unavailable: {e}")
    from tinylm.text.chat_format import is_chatml, with_inline_reasoning
    assert is_chatml(tok) and tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]) == [0, 2]
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "add"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "好的。"}]
    ids, mask = encode_chat(tok, msgs)
    for m in (msgs, with_inline_reasoning(msgs)):  # the template's own reasoning rendering agrees
        ref = tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"]
        assert ids == ref
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == "<think>\nadd\n</think>\n4<|im_end|>好的。<|im_end|>"


def test_txt_long_document_streamed_in_pieces(tmp_path, tok, monkeypatch):
    import tinylm.data.formats as formats
    monkeypatch.setattr(formats, "TXT_PIECE_CHARS", 50)
    d1, d2 = "\n".join(docs(8, seed=1)) + "\n", "\n".join(docs(3, seed=2)) + "\n"
    p = tmp_path / "c.txt"
    p.write_text(d1 + "<|endoftext|>\n" + d2)
    recs = list(iter_records(str(p)))
    assert len(recs) > 2 and "".join(r.text for r in recs) == d1 + d2
    assert [r.eos for r in recs].count(True) == 2  # a separator only after each whole document
    prep.prepare([str(p)], str(tmp_path / "o"), "pretrain", tok, seq_len=32, log=lambda s: None)
    ds, rows = read_rows(str(tmp_path / "o"))
    stream = np.concatenate([r for r, _ in rows]).tolist()
    assert stream.count(ds.eos_id) == 2 and stream[-1] == ds.eos_id
    assert tok.decode(stream) == d1 + "<|endoftext|>" + d2 + "<|endoftext|>"


def test_invalid_utf8_is_one_bad_line(tmp_path, tok_dir, cli, capsys):
    """A line that is not UTF-8 is reported with its line number and can be skipped like any bad record."""
    good = json.dumps({"text": "héllo 你好"}, ensure_ascii=False).encode()
    p = tmp_path / "bytes.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good + b"\n" + b'{"text": "caf\xe9"}\n' + good + b"\r\n")
    with pytest.raises(DataError, match=r"bytes.jsonl:3: not valid UTF-8"):
        list(iter_records(str(p)))
    st = ReadStats()
    recs = list(iter_records(str(p), skip_invalid=True, stats=st))
    assert [r.line for r in recs] == [1, 2, 4] and recs[0].text == "héllo 你好"  # BOM dropped
    assert [e.line for e in st.invalid] == [3]
    txt = tmp_path / "bytes.txt"
    txt.write_bytes(b"one line\r\n\xff\xfe broken\r\nlast line\r\n")
    with pytest.raises(DataError, match=r"bytes.txt:2: not valid UTF-8"):
        list(iter_records(str(txt)))
    recs = list(iter_records(str(txt), skip_invalid=True, stats=ReadStats()))
    assert "".join(r.text for r in recs) == "one line\nlast line\n"
    arr = tmp_path / "bytes.json"
    arr.write_bytes(b'[\n {"text": "a"},\n {"text": "\xc3"}\n]\n')
    with pytest.raises(DataError, match=r"bytes.json:3: not valid UTF-8"):
        list(iter_records(str(arr)))
    assert cli(["data", "check", str(p), "--tokenizer", tok_dir]) == 1
    out = capsys.readouterr().out
    assert "3 valid records (text: 3), 1 invalid" in out and f"{p}:3: not valid UTF-8" in out
    out_dir = str(tmp_path / "prep_bytes")
    base = ["data", "prepare", "--input", str(p), "--out", out_dir, "--kind", "pretrain", "--tokenizer", tok_dir]
    assert cli(base) == 2 and f"{p}:3: not valid UTF-8" in capsys.readouterr().err
    assert cli(base + ["--skip-invalid"]) == 0
    assert json.load(open(os.path.join(out_dir, "meta.json")))["invalid"] == 1


def test_check_flags_a_file_that_mixes_kinds(tmp_path, tok_dir, cli, capsys):
    p = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "plain text"}] + convs(2) + [{"text": "more"}])
    assert cli(["data", "check", p, "--tokenizer", tok_dir]) == 1
    out = capsys.readouterr().out
    assert "2 valid records (text: 2), 2 invalid" in out
    assert f"{p}:2: a 'messages' record (chat) in a file of pretrain records (first at line 1)" in out


def test_skipped_records_reported_again_from_cache(tmp_path, tok, capsys):
    p = write_jsonl(tmp_path / "s.jsonl", [{"text": "a b c"}, "{oops", {"text": "d e f"}])
    cache = str(tmp_path / "cache")
    load_token_dataset(p, tok, kind="pretrain", seq_len=16, skip_invalid=True, cache_dir=cache)
    assert "skipped 1 invalid" in capsys.readouterr().err
    load_token_dataset(p, tok, kind="pretrain", seq_len=16, skip_invalid=True, cache_dir=cache)  # cache hit
    assert "1 invalid records of" in capsys.readouterr().err


def test_sharegpt_from_value_messages(tmp_path):
    p = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "system", "value": "be kind"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}])
    st = ReadStats()
    recs = list(iter_records(p, skip_invalid=True, stats=st))
    assert recs[0].messages == [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]
    assert [e.line for e in st.invalid] == [2] and "robot" in str(st.invalid[0])
