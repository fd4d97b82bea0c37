"""`tinylm data clean`: remove duplicates, near-duplicates and noisy records before training.

Why: duplicated text is memorised instead of learned, wastes compute and leaks between train and
validation splits; removing exact and near-duplicates gives models that emit less memorised text
and train as well in fewer steps (Lee et al. 2022, "Deduplicating Training Data Makes Language
Models Better", ACL). Very short / long records, text in unwanted scripts and degenerate repetitive
text are noise of another kind; the repetition rules are Gopher's quality filters (Rae et al. 2021,
"Scaling Language Models: Methods, Analysis & Insights from Training Gopher", arXiv:2112.11446,
Appendix A, Table A1).

Every record of every format `tinylm.data.formats` reads is judged in one streaming pass, by the first
rule that fires, in this order: invalid -> too_short / too_long -> language -> repetition ->
exact_duplicate -> near_duplicate. Kept records are copied verbatim (jsonl lines byte for byte), so
chat and preference rows keep their structure. Deduplication is global over all inputs in the order
given and keeps the first occurrence.

  exact  blake2b-128 of the record's normalised text (NFKC, case-folded, whitespace collapsed,
         roles/fields tagged): 16 bytes of hash per kept record, held as a Python int in a set.
  near   MinHash signatures (Broder 1997, "On the resemblance and containment of documents") of
         character (or word) n-gram shingles, indexed by banded LSH (datasketch MinHashLSH); a
         candidate counts when its signature agrees with the record's on >= threshold of the
         num_perm slots (the estimated Jaccard similarity). Per kept record: num_perm x 4 bytes of
         signature plus the LSH's band keys; the text itself is never held.

Only kept records enter the indexes and signatures are deterministic (fixed seed and hash), so
cleaning the output again removes nothing. Outputs are written to `*.tmp` and renamed when a file
is complete: an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import unicodedata
import zlib
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from tinylm.data import formats

REASONS = ("invalid", "too_short", "too_long", "language", "repetition", "exact_duplicate", "near_duplicate")
TXT_UNITS = ("paragraph", "line", "document")

# Unicode script ranges for the language heuristic: a language is the script(s) it is written in.
_SCRIPTS = {
    "latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff",
    "kana": "\u3040-\u30ff\u31f0-\u31ff", "hangul": "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
    "cyrillic": "\u0400-\u052f", "greek": "\u0370-\u03ff", "arabic": "\u0600-\u06ff\u0750-\u077f",
    "devanagari": "\u0900-\u097f", "thai": "\u0e00-\u0e7f",
}
_SCRIPT_RX = {name: re.compile(f"[{chars}]+") for name, chars in _SCRIPTS.items()}
LANG_SCRIPTS = {**{k: ("latin",) for k in "en fr de es it pt nl sv da no fi pl cs tr id vi".split()},
                "zh": ("han",), "ja": ("han", "kana"), "ko": ("hangul", "han"), "ru": ("cyrillic",),
                "uk": ("cyrillic",), "el": ("greek",), "ar": ("arabic",), "hi": ("devanagari",),
                "th": ("thai",)}
_LETTER = re.compile(r"[^\W\d_]+")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_RX = re.compile(f"[{_CJK}]")
_WORD = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")  # one CJK character, or a run of other word characters
_PUNCT = re.compile(r"[^\w\s]+")

# Gopher repetition rules (Rae et al. 2021, Table A1): a record is removed when a fraction exceeds its limit.
DUP_LINE_FRAC, DUP_LINE_CHAR_FRAC = 0.30, 0.20  # for lines, and the same limits for paragraphs
TOP_NGRAM_CHAR_FRAC = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_CHAR_FRAC = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@dataclass
class CleanConfig:
    """What to remove. Defaults: invalid records, Gopher repetition, exact and near duplicates."""

    min_chars: int = 0               # 0: no minimum
    max_chars: int = 0               # 0: no maximum
    langs: tuple[str, ...] = ()      # e.g. ("en", "zh"); empty: no language filter
    lang_min_frac: float = 0.5       # share of a record's letters that must be in the wanted scripts
    repetition: bool = True
    rep_min_words: int = 50          # shorter records are not judged (the rules are document statistics)
    exact: bool = True
    near: bool = True
    threshold: float = 0.8           # estimated Jaccard similarity that makes a near-duplicate
    num_perm: int = 128
    shingle: str = "char"            # "char" | "word"
    ngram: int = 5                   # shingle length in characters or words
    txt_unit: str = "paragraph"      # one record of a .txt file: paragraph | line | document
    write_removed: bool = False      # OUT/removed/<file>.jsonl with every removed record and why
    max_examples: int = 5            # per reason and file, in the report
    progress_every: float = 10.0     # seconds between progress lines on stderr (0: never)

    def validate(self) -> None:
        bad = [x for x in self.langs if x not in LANG_SCRIPTS]
        for ok, msg in [(not bad, f"--lang: unknown {bad}; known: {','.join(sorted(LANG_SCRIPTS))}"),
                        (min(self.min_chars, self.max_chars) >= 0, "--min-chars / --max-chars must be >= 0"),
                        (not self.max_chars or self.max_chars >= self.min_chars, "--max-chars < --min-chars"),
                        (0 < self.threshold <= 1, f"--threshold must be in (0, 1], got {self.threshold}"),
                        (self.num_perm >= 16, f"--num-perm must be >= 16, got {self.num_perm}"),
                        (self.ngram >= 1, f"--ngram must be >= 1, got {self.ngram}"),
                        (self.shingle in ("char", "word"), f"--shingle: char or word, not {self.shingle!r}"),
                        (self.txt_unit in TXT_UNITS, f"--txt-unit: one of {TXT_UNITS}, not {self.txt_unit}"),
                        (0 <= self.lang_min_frac <= 1, "--lang-min-frac must be in [0, 1]")]:
            if not ok:
                raise ValueError(msg)


# ----------------------------------------------------------------------------- record text

def record_pieces(rec: formats.Record) -> list[tuple[str, str]]:
    """(tag, text) of every piece of text in a record; tags keep roles and fields apart."""
    if rec.text is not None:
        return [("text", rec.text)]
    out = []
    for name in ("messages", "prompt", "chosen", "rejected"):
        for m in getattr(rec, name) or []:
            out.append((f"{name}.{m['role']}", m.get("content") or ""))
            if m.get("reasoning_content"):
                out.append((f"{name}.{m['role']}.reasoning", m["reasoning_content"]))
    return out


def normalize(s: str) -> str:
    """NFKC, case-folded, whitespace collapsed: "Ｈｅｌｌｏ   World" and "hello world" are one text."""
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def exact_key(pieces: list[tuple[str, str]]) -> int:
    """128-bit hash of the normalised, tagged text (a collision is ~n^2 / 2^129 likely: never)."""
    s = "\x1e".join(f"{tag}\x1f{normalize(t)}" for tag, t in pieces)
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=16).digest(), "big")


# ----------------------------------------------------------------------------- filters

def script_counts(text: str) -> tuple[dict[str, int], int]:
    """Letters per script, and all letters (letters of no listed script are in the total only)."""
    counts = {name: sum(map(len, rx.findall(text))) for name, rx in _SCRIPT_RX.items()}
    return {k: v for k, v in counts.items() if v}, sum(map(len, _LETTER.findall(text)))


def language_reason(text: str, langs: tuple[str, ...], min_frac: float = 0.5) -> str | None:
    """Why `text` is not written in one of `langs` (by script share), or None. No letters: kept."""
    counts, letters = script_counts(text)
    if not letters:
        return None
    want = {s for lang in langs for s in LANG_SCRIPTS[lang]}
    share = sum(v for k, v in counts.items() if k in want) / letters
    if share >= min_frac:
        return None
    mix = ", ".join(f"{k} {v / letters:.2f}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{share:.2f} of letters in {'/'.join(sorted(want))} < {min_frac} (scripts: {mix or 'other'})"


def _dup_fracs(units: list[str]) -> tuple[float, float]:
    """Fraction of units that repeat an earlier unit, and the fraction of characters in them."""
    units = [u.strip() for u in units if u.strip()]
    seen: set[str] = set()
    n_dup = c_dup = 0
    for u in units:
        if u in seen:
            n_dup, c_dup = n_dup + 1, c_dup + len(u)
        seen.add(u)
    return n_dup / max(len(units), 1), c_dup / max(sum(map(len, units)), 1)


def _ngram_fracs(ids: np.ndarray, lens: np.ndarray, n: int) -> tuple[float, int, int, float]:
    """(top n-gram's share of the characters, its count, its first word, share of characters in
    n-grams that already occurred earlier); characters are those of the words."""
    m = len(ids) - n + 1
    if m <= 0:
        return 0.0, 0, 0, 0.0
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):  # polynomial hash of each window of word ids; uint64 wraparound is the modulus
        h = h * np.uint64(0x100000001B3) + ids[j:j + m]
    _, first, inverse, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
    total, top = float(lens.sum()), int(np.argmax(counts))
    starts = np.flatnonzero(first[inverse] < np.arange(m))  # windows repeating an earlier n-gram
    cover = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    i, count, dup = int(first[top]), int(counts[top]), lens[np.cumsum(cover[:-1]) > 0].sum() / total
    return float(count * lens[i:i + n].sum() / total), count, i, float(dup)


def repetition_reason(text: str, min_words: int = 50) -> str | None:
    """The first Gopher repetition rule `text` breaks, or None. Records under `min_words` words
    are not judged (a short answer's top bigram is most of it). Words are runs of word characters
    and each CJK character is one; for mostly-CJK text n is doubled (a Chinese word averages about
    two characters). Unlike Gopher, the top n-gram must occur at least twice."""
    words = _WORD.findall(text)
    if len(words) < min_words:
        return None
    for unit, parts in (("line", text.split("\n")), ("paragraph", re.split(r"\n\s*\n", text))):
        frac, cfrac = _dup_fracs(parts)
        if frac > DUP_LINE_FRAC:
            return f"duplicate {unit}s: {frac:.2f} of {unit}s > {DUP_LINE_FRAC}"
        if cfrac > DUP_LINE_CHAR_FRAC:
            return f"duplicate {unit}s: {cfrac:.2f} of characters > {DUP_LINE_CHAR_FRAC}"
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64)
    lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    k = 2 if 2 * len(_CJK_RX.findall(text)) > len(words) else 1
    for n, limit in TOP_NGRAM_CHAR_FRAC.items():
        frac, count, i, _ = _ngram_fracs(ids, lens, n * k)
        if count > 1 and frac > limit:
            gram = " ".join(words[i:i + n * k])
            return f"top {n * k}-gram {gram!r} x{count}: {frac:.2f} of characters > {limit}"
    for n, limit in DUP_NGRAM_CHAR_FRAC.items():
        frac = _ngram_fracs(ids, lens, n * k)[3]
        if frac > limit:
            return f"duplicate {n * k}-grams: {frac:.2f} of characters > {limit}"
    return None


# ----------------------------------------------------------------------------- near duplicates

def _identity(x: object) -> object:
    return x


def shingle_hashes(text: str, shingle: str = "char", n: int = 5) -> np.ndarray:
    """Distinct uint32 hashes of the n-gram shingles of the normalised text without punctuation.
    Char shingles suit unspaced scripts (Chinese) and short texts; a text shorter than n is one."""
    t = " ".join(_PUNCT.sub("", normalize(text)).split())
    if shingle == "char":
        codes = np.frombuffer(t.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    else:
        codes = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in _WORD.findall(t)),
                            dtype=np.uint32)
    n = min(n, len(codes))
    m = len(codes) - n + 1
    h = np.zeros(m if len(codes) else 0, dtype=np.uint32)
    for j in range(n):  # polynomial hash of each window; uint32 wraparound is the modulus
        h = h * np.uint32(0x01000193) + codes[j:j + m]
    return np.unique(h)


class NearDupIndex:
    """MinHash signatures of the kept records in a banded LSH index (datasketch)."""

    BLOCK = 1024  # signatures live in fixed blocks: growing never copies them

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: str = "char", ngram: int = 5):
        from datasketch import MinHash, MinHashLSH  # lazy: keeps `tinylm --help` fast
        self.threshold, self.num_perm, self.shingle, self.ngram = threshold, num_perm, shingle, ngram
        self._proto = MinHash(num_perm=num_perm, seed=1, hashfunc=_identity)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.blocks: list[np.ndarray] = []
        self.files, self.lines = array("I"), array("q")  # where each kept record came from

    def signature(self, text: str):
        """The datasketch MinHash of `text`'s shingles, or None for a text without any."""
        h = shingle_hashes(text, self.shingle, self.ngram)
        if not len(h):
            return None
        m = self._proto.copy()
        for i in range(0, len(h), 2048):  # bounds the (shingles x num_perm) temporary
            m.update_batch(h[i:i + 2048].tolist())
        return m

    def check_add(self, text: str, file_idx: int, line: int) -> tuple[int, int, float] | None:
        """(file, line, estimated Jaccard) of the most similar kept record at or above the
        threshold; None when there is none, and then `text` is added as a kept record."""
        m = self.signature(text)
        if m is None:
            return None
        best = None
        for key in self.lsh.query(m):  # LSH candidates, confirmed on the whole signature
            sig = self.blocks[key // self.BLOCK][key % self.BLOCK]
            j = float(np.count_nonzero(sig == m.hashvalues)) / self.num_perm
            if j >= self.threshold and (best is None or j > best[2]):
                best = (self.files[key], self.lines[key], j)
        if best is None:
            key = len(self.lines)
            if key % self.BLOCK == 0:
                self.blocks.append(np.empty((self.BLOCK, self.num_perm), dtype=m.hashvalues.dtype))
            self.blocks[-1][key % self.BLOCK] = m.hashvalues
            self.lsh.insert(key, m, check_duplication=False)
            self.files.append(file_idx)
            self.lines.append(line)
        return best


# ----------------------------------------------------------------------------- judging

class Judge:
    """Judges one record at a time; holds the dedup state shared by all input files."""

    def __init__(self, cfg: CleanConfig, paths: list[str]):
        self.cfg, self.paths = cfg, paths
        self.seen: set[int] = set()
        self.near = NearDupIndex(cfg.threshold, cfg.num_perm, cfg.shingle, cfg.ngram) if cfg.near else None

    def __call__(self, raw: object, file_idx: int, line: int) -> tuple[str | None, str, int]:
        """(reason, or None to keep; detail; line) for one raw item of `iter_items`."""
        try:
            rec = formats.parse_record(raw, self.paths[file_idx], line)
        except formats.DataError as e:
            return "invalid", (f"field '{e.field}': " if e.field else "") + e.reason, e.line or line
        pieces = record_pieces(rec)
        text = "\n".join(t for _, t in pieces if t)
        reason, detail = self._filters(text)
        if reason is None and self.cfg.exact:
            key = exact_key(pieces)
            if key in self.seen:
                reason, detail = "exact_duplicate", "same normalised text as an earlier record"
            self.seen.add(key)
        hit = self.near.check_add(text, file_idx, line) if reason is None and self.near else None
        if hit:
            reason, detail = "near_duplicate", (f"near-duplicate of {self.paths[hit[0]]}:{hit[1]} "
                                                f"(estimated Jaccard {hit[2]:.2f})")
        return reason, detail, line

    def _filters(self, text: str) -> tuple[str | None, str]:
        cfg, n = self.cfg, len(text)
        if n < cfg.min_chars:
            return "too_short", f"{n} characters < --min-chars {cfg.min_chars}"
        if cfg.max_chars and n > cfg.max_chars:
            return "too_long", f"{n} characters > --max-chars {cfg.max_chars}"
        why = language_reason(text, cfg.langs, cfg.lang_min_frac) if cfg.langs else None
        if why:
            return "language", why
        why = repetition_reason(text, cfg.rep_min_words) if cfg.repetition else None
        return ("repetition", why) if why else (None, "")


# ----------------------------------------------------------------------------- reading and writing

def _txt_units(path: str, unit: str) -> Iterator[tuple[int, object, int]]:
    """Records of a .txt file: non-blank lines, or paragraphs (lines between blank lines, cut at
    ~1 MB), as ("__txt__", text, True) items that `parse_record` reads as pretraining text."""
    buf: list[str] = []
    start = size = 0
    for i, text, n in formats._decoded_lines(path):  # noqa: SLF001 (same package)
        if isinstance(text, tuple):  # not UTF-8: a bad record for this line
            yield i, text, n
            continue
        text = text.rstrip("\r\n")
        if unit == "line":
            if text.strip():
                yield i, ("__txt__", text, True), n
            continue
        if text.strip():
            start, size = start if buf else i, size + n
            buf.append(text)
            if size < formats.TXT_PIECE_CHARS:
                continue
        if buf:
            yield start, ("__txt__", "\n".join(buf), True), size
        buf, size = [], 0
    if buf:
        yield start, ("__txt__", "\n".join(buf), True), size


def iter_items(path: str, txt_unit: str = "paragraph") -> Iterator[tuple[int, object, int]]:
    """(line, raw, bytes) per record. An error that ends a file (a broken .json array) becomes a
    last bad item for its line instead of an exception."""
    try:
        if path.lower().endswith(".txt") and txt_unit != "document":
            yield from _txt_units(path, txt_unit)
        else:
            yield from formats.iter_raw(path)
    except formats.DataError as e:
        yield e.line or 0, ("__bad__", f"{e.reason} (the rest of the file cannot be read)"), 0


class AtomicWriter:
    """Writes records in their input form to `path.tmp`; commit() renames it to `path`."""

    def __init__(self, path: str, txt_unit: str = "paragraph"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.tmp, self.unit, self.n = path, path + ".tmp", txt_unit, 0
        # backslashreplace: a lone surrogate from a JSON "\\udXXX" escape is written back as that escape
        self.f = open(self.tmp, "w", encoding="utf-8", errors="backslashreplace", newline="")

    def write(self, raw: object) -> None:
        if isinstance(raw, tuple):  # a .txt unit, separated as it was read
            text, eos = raw[1], raw[2]
            sep = "\n" if self.unit == "line" else "\n\n"
            if self.unit == "document":
                sep = ("" if text.endswith("\n") else "\n") + formats.TXT_SEPARATOR + "\n" if eos else ""
            self.f.write(text + sep)
        elif isinstance(raw, str):  # a jsonl line, verbatim
            self.f.write(raw if raw.endswith("\n") else raw + "\n")
        else:  # an item of a .json array
            self.f.write(("[\n" if self.n == 0 else ",\n") + json.dumps(raw, ensure_ascii=False))
        self.n += 1

    def commit(self) -> None:
        if self.path.lower().endswith(".json"):
            self.f.write("\n]\n" if self.n else "[]\n")
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def output_names(inputs: list[str], out_dir: str) -> list[str]:
    """Each input's path relative to the inputs' common folder (one input: its file name)."""
    absd = [os.path.abspath(p) for p in inputs]
    root = os.path.commonpath([os.path.dirname(p) for p in absd])
    rels = [os.path.relpath(p, root) for p in absd]
    if len(set(rels)) < len(rels):
        raise ValueError("the same input file is given twice")
    for src, rel in zip(absd, rels):
        if os.path.abspath(os.path.join(out_dir, rel)) == src:
            raise ValueError(f"{src}: --out {out_dir} would overwrite this input; choose another directory")
    return rels


def _removed_row(raw: object, path: str, line: int, reason: str, detail: str) -> str:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            pass
    elif isinstance(raw, tuple):
        raw = raw[1] if raw[0] == "__txt__" else None
    row = {"source": path, "line": line, "reason": reason, "detail": detail, "record": raw}
    return json.dumps(row, ensure_ascii=False)


# ----------------------------------------------------------------------------- driver

class Progress:
    """A progress line on stderr every `every` seconds: records/s and MB/s since the start."""

    def __init__(self, every: float):
        self.every, self.t0 = every, time.monotonic()
        self.last, self.n, self.kept, self.bytes = self.t0, 0, 0, 0

    def tick(self, n_bytes: int, kept: bool, path: str) -> None:
        self.n, self.kept, self.bytes = self.n + 1, self.kept + kept, self.bytes + n_bytes
        now = time.monotonic()
        if self.every > 0 and now - self.last >= self.every:
            self.last, dt = now, now - self.t0
            print(f"clean: {self.n:,} records, {self.kept:,} kept, {self.n / dt:,.0f} records/s, "
                  f"{self.bytes / 1e6 / dt:.2f} MB/s ({path})", file=sys.stderr, flush=True)


def _clean_file(file_idx: int, out: str, removed_out: str | None, judge: Judge, prog: Progress) -> dict:
    """Clean one input into `out` (and its removed records into `removed_out`); its report."""
    cfg, src = judge.cfg, judge.paths[file_idx]
    rep = {"path": src, "out": out, "records_in": 0, "records_out": 0, "bytes_in": 0, "removed": {},
           "examples": {}}
    removed: Counter = Counter()
    writers = [AtomicWriter(out, cfg.txt_unit)] + ([AtomicWriter(removed_out)] if removed_out else [])
    try:
        for line, raw, n_bytes in iter_items(src, cfg.txt_unit):
            reason, detail, line = judge(raw, file_idx, line)
            rep["records_in"] += 1
            rep["bytes_in"] += n_bytes
            if reason is None:
                writers[0].write(raw)
                rep["records_out"] += 1
            else:
                removed[reason] += 1
                if removed[reason] <= cfg.max_examples:
                    rep["examples"].setdefault(reason, []).append(f"{src}:{line}: {detail}")
                if removed_out:
                    writers[1].write(_removed_row(raw, src, line, reason, detail))
            prog.tick(n_bytes, reason is None, src)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        w.commit()
    rep["removed"] = {r: removed[r] for r in REASONS if removed[r]}
    return rep


def clean(inputs: list[str] | str, out_dir: str, cfg: CleanConfig | None = None, log=print) -> dict:
    """Clean `inputs` into `out_dir` (see the module docstring). Returns the report, which is also
    written to OUT/clean_report.json and printed with `log`."""
    cfg = cfg or CleanConfig()
    cfg.validate()
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    for p in inputs:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such data file")
    rels = output_names(inputs, out_dir)
    judge, prog = Judge(cfg, inputs), Progress(cfg.progress_every)
    files = []
    for i, rel in enumerate(rels):
        removed_out = os.path.join(out_dir, "removed", rel + ("" if rel.endswith(".jsonl") else ".jsonl"))
        files.append(_clean_file(i, os.path.join(out_dir, rel), removed_out if cfg.write_removed else None,
                                 judge, prog))
    dt = max(time.monotonic() - prog.t0, 1e-9)
    total = sum((Counter(f["removed"]) for f in files), Counter())
    n_sig, removed = len(judge.near.lines) if judge.near else 0, {r: total[r] for r in REASONS if total[r]}
    report = {"records_in": prog.n, "records_out": prog.kept, "removed": removed,
              "seconds": round(dt, 3), "records_per_s": round(prog.n / dt, 1),
              "mb_per_s": round(prog.bytes / 1e6 / dt, 3), "config": asdict(cfg), "files": files,
              "index": {"exact_hashes": len(judge.seen), "near_signatures": n_sig}}
    path = os.path.join(out_dir, "clean_report.json")
    with open(path + ".tmp", "w", encoding="utf-8", errors="backslashreplace") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    for f in files:
        why = ", ".join(f"{k} {v}" for k, v in f["removed"].items()) or "nothing"
        log(f"{f['path']}: {f['records_in']} -> {f['records_out']} records in {f['out']}; removed: {why}")
        for lines in f["examples"].values():
            for s in lines:
                log(f"  {s}")
    why = ", ".join(f"{k} {v}" for k, v in report["removed"].items()) or "nothing"
    log(f"total: {prog.n} -> {prog.kept} records (removed: {why}) in {dt:.1f}s, "
        f"{prog.n / dt:,.0f} records/s; report: {path}")
    return report


# ----------------------------------------------------------------------------- CLI

def _cmd_clean(args: argparse.Namespace) -> int:
    cfg = CleanConfig(**{k: getattr(args, k) for k in CleanConfig.__dataclass_fields__})
    clean(args.inputs, args.out, cfg)
    return 0


def add_cli(dsub: argparse._SubParsersAction) -> None:
    """`tinylm data clean`, added to the `data` sub-commands by tinylm.data.prepare.add_cli."""
    c = dsub.add_parser("clean", help="remove duplicates, near-duplicates and noisy records (docs/data.md)")
    add = c.add_argument
    add("inputs", nargs="+", help=".jsonl / .json / .txt files (deduplicated together, in this order)")
    add("--out", required=True, help="output directory: OUT/<file> per input + OUT/clean_report.json")
    add("--min-chars", type=int, default=0, help="remove records with fewer characters")
    add("--max-chars", type=int, default=0, help="remove records with more characters (0: no limit)")
    add("--lang", dest="langs", default=(), type=lambda v: tuple(filter(None, v.replace(" ", "").split(","))),
        help="keep only records in these languages' scripts, e.g. en,zh")
    add("--lang-min-frac", type=float, default=0.5, help="share of letters in the wanted scripts")
    add("--no-repetition", dest="repetition", action="store_false", help="skip the Gopher repetition rules")
    add("--rep-min-words", type=int, default=50, help="judge repetition only from this many words on")
    add("--no-exact", dest="exact", action="store_false", help="keep exact duplicates")
    add("--no-near", dest="near", action="store_false", help="keep near-duplicates (no MinHash)")
    add("--threshold", type=float, default=0.8, help="near-duplicate (estimated Jaccard) threshold")
    add("--num-perm", type=int, default=128, help="MinHash permutations (4 bytes each per kept record)")
    add("--shingle", choices=["char", "word"], default="char", help="shingles of characters or of words")
    add("--ngram", type=int, default=5, help="shingle length in characters or words")
    add("--txt-unit", choices=TXT_UNITS, default="paragraph", help="what one record of a .txt file is")
    add("--write-removed", action="store_true", help="also write OUT/removed/<file>.jsonl")
    add("--max-examples", type=int, default=5, help="examples per reason and file in the report")
    add("--progress-every", type=float, default=10.0, help="seconds between progress lines (0: off)")
    c.set_defaults(func=_cmd_clean)
