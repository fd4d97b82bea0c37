"""`tinylm data clean`: dedup recall/precision on planted duplicates, each filter, idempotence,
bad lines with file:line, structure of chat/preference rows, atomic output, memory per record."""

from __future__ import annotations

import functools
import json
import os
import random
import re
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from tinylm.data import clean as cl
from tinylm.data.formats import iter_raw, parse_record

DATA = Path(__file__).resolve().parents[1] / "data"
HAN = re.compile("[\u4e00-\u9fff]")
QUIET = {"progress_every": 0}


def write_jsonl(path: Path, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run(inputs, out, log=None, **cfg) -> dict:
    return cl.clean(inputs, str(out), cl.CleanConfig(**{**QUIET, **cfg}), log=log or (lambda s: None))


def shingles(text: str) -> set[str]:
    """Ground truth for "distinct": 5-character shingles, computed independently of tinylm.data.clean."""
    t = " ".join(text.lower().split())
    return {t[i:i + 5] for i in range(max(1, len(t) - 4))}


def jaccard(s: set, t: set) -> float:
    inter = len(s & t)
    return inter / (len(s) + len(t) - inter)


@functools.cache
def distinct_paragraphs(n_en: int = 170, n_zh: int = 30, seed: int = 0) -> tuple[str, ...]:
    """Real prose paragraphs of the bundled pretraining data (English, Chinese), pairwise Jaccard < 0.3."""
    en, zh = [], []
    for line in open(DATA / "pretrain" / "train.jsonl", encoding="utf-8"):
        for p in json.loads(line)["text"].split("\n\n"):
            p = p.strip()
            if 200 <= len(p) <= 800 and len(HAN.findall(p)) > 0.6 * len(p):
                zh.append(p)
            elif 400 <= len(p) <= 1200 and not HAN.search(p) and len(re.findall(r"\b[A-Za-z]{3,}\b", p)) >= 50:
                en.append(p)
    rng = random.Random(seed)
    rng.shuffle(en)
    rng.shuffle(zh)
    kept: list[tuple[str, set]] = []
    for pool, want in ((en, n_en), (zh, n_zh)):
        for p in pool[:3 * want]:
            s = shingles(p)
            if len(kept) < want + (n_en if pool is zh else 0) and all(jaccard(s, t) < 0.3 for _, t in kept):
                kept.append((p, s))
    assert len(kept) == n_en + n_zh, "not enough distinct paragraphs in data/pretrain/train.jsonl"
    return tuple(p for p, _ in kept)


def paras(n_en: int, n_zh: int, start: int = 0) -> list[str]:
    """n_en English and n_zh Chinese paragraphs of the cached distinct selection, from `start` on."""
    base = distinct_paragraphs()
    return list(base[start:start + n_en]) + list(base[170 + start:170 + start + n_zh])


def exact_variant(p: str, rng: random.Random) -> str:
    """Same text after NFKC + case folding + whitespace collapsing."""
    kind = rng.randrange(3)
    if kind == 0:
        return p.upper()
    if kind == 1:
        return "  " + p.replace(" ", "   ").replace("\n", " \n\t") + "\n"
    head, _, rest = p.partition(" ")  # fullwidth letters (NFKC folds them back)
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in head) + " " + rest


def near_variant(p: str, rng: random.Random, vocab: list[str]) -> str:
    """A few words (Chinese: characters) changed, punctuation and case edits."""
    if len(HAN.findall(p)) > len(p) / 2:
        chars = list(p.replace("，", ",", 1))
        han = [i for i, c in enumerate(chars) if HAN.match(c)]
        for i in rng.sample(han, rng.randint(1, 3)):
            chars[i] = rng.choice("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动")
        return "".join(chars)
    words = re.split(r"(\s+)", p)  # words and the whitespace between them
    slots = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 3]
    for i in rng.sample(slots, min(len(slots), rng.randint(1, 3))):
        words[i] = rng.choice(vocab)
    i = rng.choice(slots)
    words[i] = words[i].upper()
    out = "".join(words)
    return out.replace(",", ";", 1) if "," in out else out + "!"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[str, dict[int, str]]:
    """200 distinct paragraphs + 40 exact and 60 near copies placed after their originals."""
    rng = random.Random(1)
    base = distinct_paragraphs()
    vocab = sorted({w for p in base for w in p.split() if w.isalpha() and len(w) > 3})
    rows = [{"id": i, "text": p} for i, p in enumerate(base)]
    truth = {i: "kept" for i in range(len(base))}
    for k, src in enumerate(rng.sample(range(len(base)), 100)):
        kind = "exact_duplicate" if k < 40 else "near_duplicate"
        text = exact_variant(base[src], rng) if k < 40 else near_variant(base[src], rng, vocab)
        rid = len(base) + k
        rows.insert(rng.randint([r["id"] for r in rows].index(src) + 1, len(rows)), {"id": rid, "text": text})
        truth[rid] = kind
    path = write_jsonl(tmp_path_factory.mktemp("planted") / "planted.jsonl", rows)
    return path, truth


# ----------------------------------------------------------------------------- deduplication

def test_dedup_recall_precision(planted, tmp_path):
    path, truth = planted
    rep = run([path], tmp_path / "out", repetition=False, write_removed=True)
    removed = {r["record"]["id"]: r["reason"] for r in read_jsonl(str(tmp_path / "out" / "removed" / "planted.jsonl"))}
    kept = {r["id"] for r in read_jsonl(str(tmp_path / "out" / "planted.jsonl"))}
    assert kept | set(removed) == set(truth) and not kept & set(removed)
    planted_ids = {i for i, t in truth.items() if t != "kept"}
    hits = planted_ids & set(removed)
    recall, precision = len(hits) / len(planted_ids), len(hits) / max(len(removed), 1)
    by_kind = {k: sum(removed.get(i) is not None for i in planted_ids if truth[i] == k) /
               sum(truth[i] == k for i in planted_ids) for k in ("exact_duplicate", "near_duplicate")}
    print(f"\ndedup on {len(truth)} records ({len(truth) - len(planted_ids)} distinct, {len(planted_ids)} planted "
          f"copies): removed {len(removed)}, recall {recall:.3f} (exact {by_kind['exact_duplicate']:.3f}, "
          f"near {by_kind['near_duplicate']:.3f}), precision {precision:.3f}, {rep['seconds']:.2f}s")
    assert recall >= 0.9 and precision >= 0.95
    assert by_kind["exact_duplicate"] == 1.0
    assert all(removed[i] == "exact_duplicate" for i in planted_ids if truth[i] == "exact_duplicate")
    assert rep["removed"] == dict(Counter(removed.values()))


def test_near_duplicate_names_the_first_occurrence_across_files(tmp_path):
    base = paras(3, 0, 2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_jsonl(tmp_path / "a" / "train.jsonl", [{"text": p} for p in base])
    edited = base[1].replace(" the ", " a ", 1) + " Indeed."
    b = write_jsonl(tmp_path / "b" / "train.jsonl", [{"text": edited}, {"text": "a new record"}])
    rep = run([a, b], tmp_path / "out")
    assert [f["out"] for f in rep["files"]] == [str(tmp_path / "out" / "a" / "train.jsonl"),
                                                str(tmp_path / "out" / "b" / "train.jsonl")]
    assert rep["files"][1]["removed"] == {"near_duplicate": 1}
    assert rep["files"][1]["examples"]["near_duplicate"][0].startswith(f"{b}:1: near-duplicate of {a}:2 ")


def test_refuses_to_overwrite_an_input(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", [{"text": "one"}, {"text": "one"}])
    with pytest.raises(ValueError, match="would overwrite"):
        run([src], tmp_path)
    assert read_jsonl(src) == [{"text": "one"}, {"text": "one"}]


def test_shingles_and_thresholds():
    a = "The quick brown fox jumps over the lazy dog near the quiet river bank this morning."
    idx = cl.NearDupIndex(threshold=0.8)
    assert idx.check_add(a, 0, 1) is None
    hit = idx.check_add(a.upper().replace(".", "!"), 0, 2)  # case and punctuation do not count
    assert hit is not None and hit[:2] == (0, 1) and hit[2] == 1.0
    assert idx.check_add("A completely different sentence about databases and their indexes.", 0, 3) is None
    zh = cl.shingle_hashes("你好，世界！今天天气很好。", "char", 5)  # CJK works without spaces
    assert len(zh) == 6 and (zh == cl.shingle_hashes("你好世界今天天气很好", "char", 5)).all()


# ----------------------------------------------------------------------------- filters

def test_length_language_and_repetition_filters(tmp_path):
    prose = " ".join(paras(1, 0, 3)[0].split()[:80])
    rows = [
        {"id": "short", "text": "hi"},
        {"id": "long", "text": "word " * 400},
        {"id": "ru", "text": "Это предложение написано по-русски и должно быть удалено фильтром."},
        {"id": "zh", "text": "这是一个用中文写的句子，应该被保留。"},
        {"id": "mixed", "text": "我是 tinylm，一个用 tinylm 工具从零训练的小型语言模型。"},
        {"id": "digits", "text": "2 + 2 = 4, 3 * 3 = 9"},
        {"id": "dup_lines", "text": "\n".join(["Buy now!", "Cheap pills", "Buy now!", "Buy now!"] * 20)},
        {"id": "ngram", "text": " ".join(["click here to win a prize"] * 12 + prose.split()[:20])},
        {"id": "prose", "text": prose},
    ]
    rep = run([write_jsonl(tmp_path / "f.jsonl", rows)], tmp_path / "out", min_chars=5, max_chars=1500,
              langs=("en", "zh"), write_removed=True, near=False)
    why = {r["record"]["id"]: r["reason"] for r in read_jsonl(str(tmp_path / "out" / "removed" / "f.jsonl"))}
    assert why == {"short": "too_short", "long": "too_long", "ru": "language", "dup_lines": "repetition",
                   "ngram": "repetition"}
    assert {r["id"] for r in read_jsonl(str(tmp_path / "out" / "f.jsonl"))} == {"zh", "mixed", "digits", "prose"}
    assert rep["files"][0]["examples"]["language"][0].startswith(f"{tmp_path / 'f.jsonl'}:3: 0.00 of letters")
    assert cl.language_reason("我是 tinylm，一个用 tinylm 工具从零训练的小型语言模型。", ("en",)) is not None
    with pytest.raises(ValueError, match="unknown"):
        run([str(tmp_path / "f.jsonl")], tmp_path / "o2", langs=("xx",))


def test_gopher_repetition_rules():
    en = paras(170, 0)
    passed = [p for p in en if cl.repetition_reason(p) is None]
    print(f"\nrepetition rules keep {len(passed)} of {len(en)} distinct English paragraphs of data/pretrain")
    assert len(passed) >= 0.9 * len(en)
    prose = passed[0]
    assert cl.repetition_reason("ok\nok\nok") is None  # under 50 words: not judged
    assert cl.repetition_reason("\n".join(["same line here"] * 30)).startswith("duplicate lines")
    top = " ".join(["lorem ipsum"] * 8 + [f"w{i}" for i in range(60)])
    assert cl.repetition_reason(top).startswith("top 2-gram 'lorem ipsum' x8")
    words = prose.split()[:60]
    assert cl.repetition_reason(" ".join(words[:30] + words[:30])).startswith("duplicate 5-grams")
    zh = "".join(paras(0, 1, 4))
    assert cl.repetition_reason(zh) is None  # Chinese prose: each character a word, n doubled


# ----------------------------------------------------------------------------- robustness

def test_bad_lines_are_reported_with_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "fine record one"}\n')
        f.write(b'{"text": "broken json"\n')
        f.write(b'{"text": "caf\xe9 not utf-8"}\n')
        f.write(b'{"foo": 1}\n')
        f.write(b'[1, 2]\n')
        f.write(b'{"messages": [{"role": "bot", "content": "x"}]}\n')
        f.write(b'{"text": "fine record two"}\n')
    rep = cl.clean([str(p)], str(tmp_path / "out"), cl.CleanConfig(**QUIET))
    printed = capsys.readouterr().out
    f0 = rep["files"][0]
    assert f0["removed"] == {"invalid": 5} and f0["records_out"] == 2
    for line, what in ((2, "invalid JSON"), (3, "not valid UTF-8"), (4, "unrecognised record"),
                       (5, "expected a JSON object"), (6, "field 'messages[0].role'")):
        assert any(e.startswith(f"{p}:{line}: {what}") for e in f0["examples"]["invalid"]), (line, what)
        assert f"{p}:{line}: {what}" in printed
    broken = tmp_path / "arr.json"
    broken.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"},\n {oops}\n]')
    rep = run([str(broken)], tmp_path / "out2")
    assert rep["files"][0]["records_out"] == 2 and rep["files"][0]["examples"]["invalid"][0].startswith(f"{broken}:3:")
    assert len(json.loads((tmp_path / "out2" / "arr.json").read_text())) == 2


def test_interrupted_run_leaves_no_partial_file(tmp_path, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"record number {i}"} for i in range(100)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.jsonl").write_text("previous complete output\n")
    real, n = cl.Judge.__call__, [0]

    def flaky(self, raw, file_idx, line):
        n[0] += 1
        if n[0] == 50:
            raise KeyboardInterrupt
        return real(self, raw, file_idx, line)

    monkeypatch.setattr(cl.Judge, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        run([a], out, write_removed=True)
    assert (out / "a.jsonl").read_text() == "previous complete output\n"
    assert not [f for f in out.rglob("*") if f.is_file() and f.name != "a.jsonl"]


def test_memory_per_kept_record_does_not_grow_with_text():
    """The dedup state holds hashes and signatures, not text: 120 records of ~250 or ~6,000
    characters cost the same (fresh indexes, so both include the same table growth)."""
    rng = random.Random(5)
    vocab = sorted({w for p in paras(30, 0, 5) for w in p.split()})
    sizes = []
    for n_words in (40, 1000):
        texts = [" ".join(rng.choices(vocab, k=n_words)) for _ in range(120)]
        judge = cl.Judge(cl.CleanConfig(repetition=False), ["mem.jsonl"])  # imports datasketch
        tracemalloc.start()
        for i, t in enumerate(texts):
            assert judge({"text": t}, 0, i + 1)[0] is None
        block = cl.NearDupIndex.BLOCK * judge.cfg.num_perm * 4  # preallocated signature block
        sizes.append((tracemalloc.get_traced_memory()[0] - block) / len(texts))
        tracemalloc.stop()
    print(f"\ndedup state per kept record: {sizes[0]:.0f} B (250-char records), {sizes[1]:.0f} B (6k-char records)"
          " + 512 B of signature")
    assert abs(sizes[1] - sizes[0]) < 0.15 * sizes[0] and sizes[1] < 6000


# ----------------------------------------------------------------------------- formats, idempotence, CLI

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Add two and two."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nAdd.\n</think>\n4"}]},
    {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！有什么可以帮你的吗？"}]},
    {"prompt": "Say hi", "completion": "Hi there."},
    {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "what"}]},
    {"prompt": "Write a haiku", "chosen": "Autumn moonlight, a worm digs silently.", "rejected": "no"},
    {"chosen": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "Hey! How can I help?"}],
     "rejected": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "go away"}]},
]


def test_chat_and_preference_rows_keep_their_structure(tmp_path):
    same_as_first = {"messages": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "4", "reasoning_content": "ADD two and two."}]}
    lines = [json.dumps(r, ensure_ascii=False) for r in CHAT]
    src = write_jsonl(tmp_path / "chat.jsonl", lines[:3] + [json.dumps(same_as_first)] + lines[3:] + [lines[2], lines[5]])
    rep = run([src], tmp_path / "out")
    assert (tmp_path / "out" / "chat.jsonl").read_text(encoding="utf-8").splitlines() == lines  # verbatim
    assert rep["files"][0]["removed"] == {"exact_duplicate": 3}
    fmts = [parse_record(raw, "chat.jsonl", i).format for i, raw, _ in iter_raw(str(tmp_path / "out" / "chat.jsonl"))]
    assert fmts == ["messages", "messages", "conversations", "prompt_completion", "preference", "preference",
                    "chosen_rejected"]
    alpaca = [{"instruction": "Translate to French", "input": "cat", "output": "chat"},
              {"instruction": "translate to french", "input": "CAT", "output": "Chat"},
              {"instruction": "Name a color", "input": "", "output": "蓝色"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False, indent=1), encoding="utf-8")
    run([str(tmp_path / "alpaca.json")], tmp_path / "out2")
    assert json.loads((tmp_path / "out2" / "alpaca.json").read_text(encoding="utf-8")) == [alpaca[0], alpaca[2]]


def test_txt_units(tmp_path):
    ps = paras(3, 1, 6)
    text = "\n\n".join([ps[0], ps[1], ps[0].upper(), ps[2], "", ps[3], ps[1]]) + "\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    rep = run([str(tmp_path / "t.txt")], tmp_path / "out", repetition=False)
    assert rep["files"][0]["removed"] == {"exact_duplicate": 2}
    assert (tmp_path / "out" / "t.txt").read_text(encoding="utf-8") == "\n\n".join(ps) + "\n\n"
    (tmp_path / "l.txt").write_text("one line\ntwo line\n\nONE   line\n", encoding="utf-8")
    run([str(tmp_path / "l.txt")], tmp_path / "out", txt_unit="line")
    assert (tmp_path / "out" / "l.txt").read_text() == "one line\ntwo line\n"
    (tmp_path / "d.txt").write_text("doc a\nline\n<|endoftext|>\ndoc b\n<|endoftext|>\nDOC A\nline\n", encoding="utf-8")
    run([str(tmp_path / "d.txt")], tmp_path / "out", txt_unit="document")
    assert (tmp_path / "out" / "d.txt").read_text() == "doc a\nline\n<|endoftext|>\ndoc b\n<|endoftext|>\n"


def test_idempotent(planted, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", CHAT + CHAT[:3])
    ps = paras(2, 1, 7)
    (tmp_path / "t.txt").write_text("\n\n".join(ps + [ps[0].lower()]) + "\n", encoding="utf-8")
    inputs = [planted[0], chat, str(tmp_path / "t.txt")]
    first = run(inputs, tmp_path / "once")
    assert first["records_out"] < first["records_in"]
    again = [os.path.join(tmp_path / "once", os.path.relpath(f["out"], tmp_path / "once")) for f in first["files"]]
    second = run(again, tmp_path / "twice")
    assert second["removed"] == {} and second["records_in"] == first["records_out"]
    for a, b in zip(first["files"], second["files"]):
        assert Path(a["out"]).read_bytes() == Path(b["out"]).read_bytes()


def test_cli(tmp_path, monkeypatch, capsys):
    from tinylm import cli
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["tinylm.data.prepare"])
    src = write_jsonl(tmp_path / "c.jsonl", CHAT + CHAT[:2] + ["not json"])
    out = tmp_path / "out"
    assert cli.main(["data", "clean", src, "--out", str(out), "--write-removed", "--progress-every", "1e-9",
                     "--lang", "en,zh", "--threshold", "0.9", "--num-perm", "64"]) == 0
    cap = capsys.readouterr()
    assert "records/s" in cap.err and f"{src}:10: invalid JSON" in cap.out
    report = json.loads((out / "clean_report.json").read_text())
    assert report["removed"] == {"invalid": 1, "exact_duplicate": 2} and report["config"]["langs"] == ["en", "zh"]
    assert [r["line"] for r in read_jsonl(str(out / "removed" / "c.jsonl"))] == [8, 9, 10]
    assert cli.main(["data", "clean", src, "--out", str(out), "--threshold", "2"]) == 2
    assert "--threshold must be in (0, 1]" in capsys.readouterr().err
