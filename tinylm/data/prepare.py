"""Tokenize a dataset once into memory-mapped token files that training reads directly.

Why: tokenizing on the fly costs more CPU than a small model's forward pass, and loading a
multi-GB jsonl into Python lists does not fit in RAM. Like nanoGPT's `prepare.py` (train.bin of
uint16 ids) we write a flat token stream, plus what chat training needs:

  DIR/tokens.bin   all rows back to back, uint16 (vocab < 65536) or uint32
  DIR/mask.bin     uint8 per token (sft only): bit 0 = trained token; bit 1 = first token of a
                   conversation in a packed row (training restarts positions and attention there)
  DIR/offsets.npy  int64 (n_rows + 1,): row i = tokens[offsets[i]:offsets[i+1]]
  DIR/meta.json    kind, seq_len, vocab_size, dtype, eos/pad ids, counts, sources, tokenizer hash
  DIR/val/...      the same layout for the validation split (--val-fraction)

Pretraining documents are joined with the document separator (`<|endoftext|>`) and packed into
rows of exactly seq_len tokens (no padding; long documents continue in the next row; only the
very last row may be shorter, and that is reported). SFT keeps one conversation per row
(truncated to seq_len and counted) or, with --pack, greedily packs whole conversations; each packed
conversation is marked so that it attends only to itself (same loss as unpacked, no padding).

The pipeline streams: lines are read lazily, encoded by a multiprocessing pool in chunks with a
bounded number in flight, and the results are written in input order, so N workers produce the
same bytes as one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterator

import numpy as np

from tinylm.data.formats import DataError, ReadStats, check_kind, iter_raw, parse_record
from tinylm.text.chat_format import encode_chat, encode_preference
from tinylm.text.special_tokens import encode_text, find_special, resolve_allow

FORMAT_VERSION = 3  # 2: packed SFT rows mark conversation starts (mask bit 1); 3: special strings in text are text
TRAINED, DOC_START = 1, 2  # mask.bin bits
CHUNK_BYTES = 1 << 20  # raw text per worker task


# ----------------------------------------------------------------------------- tokenizer helpers

def get_tokenizer(spec=None):
    """A tokenizer object from None (bundled), a directory path, or an object (returned as is)."""
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        return spec
    try:
        from tinylm.text.tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer(None if spec is None else str(spec))
    if spec is None:
        raise ValueError("the bundled tokenizer is not available; pass --tokenizer DIR")
    if not os.path.isdir(str(spec)):
        raise FileNotFoundError(f"{spec}: tokenizer directory not found")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(spec))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition and chat template (cache key, meta.json)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(str(getattr(tokenizer, "eos_token", "")).encode())
    from tinylm.text.tool_format import (
        TOOL_TEMPLATE,  # renders tool rows of ChatML tokenizers (tool_format.py)
    )

    h.update(TOOL_TEMPLATE.encode())
    return h.hexdigest()


def doc_separator_id(tokenizer) -> int:
    """Token appended after every pretraining document: <|endoftext|> if present, else eos."""
    tid = tokenizer.get_vocab().get("<|endoftext|>")
    if tid is None:
        tid = tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither <|endoftext|> nor an eos token to separate documents")
    return int(tid)


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    return int(pid) if pid is not None else doc_separator_id(tokenizer)


def record_strings(rec) -> Iterator[tuple[str, str]]:
    """(field, text) of every piece of data text in a record (roles excluded): what a user wrote."""
    if rec.text is not None:
        yield "text", rec.text
    for name in ("messages", "prompt", "chosen", "rejected"):
        for i, m in enumerate(getattr(rec, name) or []):
            for key in ("content", "reasoning_content"):
                if isinstance(m.get(key), str):
                    yield f"{name}[{i}].{key}", m[key]


# ----------------------------------------------------------------------------- parallel encoding

_W: dict = {}  # per-process worker state (tokenizer, kind, separator id)


def _init_worker(tokenizer, kind: str | None, allow: frozenset[str], in_pool: bool = True) -> None:
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _W.update(tok=tokenizer, kind=kind, sep=doc_separator_id(tokenizer), allow=allow)


def _special_field(tok, rec) -> str | None:
    """The first field of `rec` whose text contains a special-token string, or None."""
    return next((name for name, text in record_strings(rec) if find_special(tok, text)), None)


def _encode_chunk(chunk: list[tuple[str, int, object]]) -> list[tuple]:
    """Parse, validate and tokenize a chunk of raw items; errors are returned, not raised."""
    tok, kind, sep, allow = _W["tok"], _W["kind"], _W["sep"], _W["allow"]
    out = []
    for path, line, raw in chunk:
        try:
            rec = parse_record(raw, path, line)
            check_kind(rec, kind, path, line)
        except DataError as e:
            out.append(("err", e))
            continue
        mask = None
        if rec.kind == "pretrain":
            ids = encode_text(tok, rec.text, allow)
            if rec.eos:
                ids.append(sep)
        elif rec.kind == "chat":
            ids, mask = encode_chat(tok, rec.messages, allow=allow, tools=rec.tools, enable_thinking=rec.enable_thinking)
        else:  # preference: only `data check` gets here; report the longer of the two sequences
            a = encode_preference(tok, rec.prompt, rec.chosen, allow=allow)
            b = encode_preference(tok, rec.prompt, rec.rejected, allow=allow)
            ids, mask = a if len(a[0]) >= len(b[0]) else b
        out.append(("ok", rec.format, path, line, np.asarray(ids, dtype=np.uint32),
                    None if mask is None else np.asarray(mask, dtype=np.uint8), _special_field(tok, rec)))
    return out


def encode_stream(paths: list[str], tokenizer, kind: str | None = None, workers: int = 1,
                  skip_invalid: bool = False, stats: ReadStats | None = None,
                  allow_special_tokens: bool | list[str] = False,
                  ) -> Iterator[tuple[str, str, int, np.ndarray, np.ndarray | None]]:
    """Yield (format, path, line, ids uint32, mask uint8 | None) for every valid record, in input
    order. Reads lazily; at most ~2*workers chunks are in memory. Bad records raise DataError, or
    with skip_invalid are collected in stats.invalid. Special-token strings in the data are plain
    text unless `allow_special_tokens` (True, or a list of them); records holding any are counted
    in stats.special."""
    stats = stats if stats is not None else ReadStats()
    allow = resolve_allow(tokenizer, allow_special_tokens)

    def chunks() -> Iterator[list]:
        for path in paths:
            chunk, size = [], 0
            for line, raw, nbytes in iter_raw(path):
                stats.n_bytes += nbytes
                chunk.append((str(path), line, raw))
                size += nbytes
                if size >= CHUNK_BYTES or len(chunk) >= 8192:
                    yield chunk
                    chunk, size = [], 0
            if chunk:
                yield chunk

    def consume(results: list[tuple]) -> Iterator[tuple]:
        for r in results:
            if r[0] == "err":
                if not skip_invalid:
                    raise r[1]
                stats.invalid.append(r[1])
            else:
                stats.counts[r[1]] += 1
                if r[6] is not None:
                    stats.n_special += 1
                    if len(stats.special) < 5:
                        stats.special.append(f"{r[2]}:{r[3]}: {r[6]}")
                yield r[1:6]

    if workers <= 1:
        _init_worker(tokenizer, kind, allow, in_pool=False)
        for c in chunks():
            yield from consume(_encode_chunk(c))
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, kind, allow)) as pool:
        pending: deque = deque()
        for c in chunks():
            pending.append(pool.apply_async(_encode_chunk, (c,)))
            if len(pending) >= 2 * workers:  # bounded: never read far ahead of the writer
                yield from consume(pending.popleft().get())
        while pending:
            yield from consume(pending.popleft().get())


# ----------------------------------------------------------------------------- writing rows

class RowWriter:
    """Append rows to tokens.bin (+ mask.bin) incrementally; finish() writes offsets + meta atomically."""

    def __init__(self, out_dir: str, dtype: np.dtype, with_mask: bool):
        os.makedirs(out_dir, exist_ok=True)
        self.dir, self.dtype = out_dir, np.dtype(dtype)
        self.tok_f = open(os.path.join(out_dir, "tokens.bin.tmp"), "wb")
        self.mask_f = open(os.path.join(out_dir, "mask.bin.tmp"), "wb") if with_mask else None
        self.offsets = array("q", [0])
        self.n_trained = 0

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        ids.astype(self.dtype, copy=False).tofile(self.tok_f)
        if self.mask_f is not None:
            mask.astype(np.uint8, copy=False).tofile(self.mask_f)
            self.n_trained += int((mask & TRAINED).sum())
        self.offsets.append(self.offsets[-1] + len(ids))

    def abort(self) -> None:
        for f in (self.tok_f, self.mask_f):
            if f is not None:
                f.close()
                os.remove(f.name)

    def finish(self, meta: dict) -> dict:
        self.tok_f.close()
        names = ["tokens.bin"]
        if self.mask_f is not None:
            self.mask_f.close()
            names.append("mask.bin")
        np.save(os.path.join(self.dir, "offsets.npy.tmp.npy"), np.frombuffer(self.offsets, dtype=np.int64))
        os.replace(os.path.join(self.dir, "offsets.npy.tmp.npy"), os.path.join(self.dir, "offsets.npy"))
        for n in names:
            os.replace(os.path.join(self.dir, n + ".tmp"), os.path.join(self.dir, n))
        if self.mask_f is None and os.path.exists(os.path.join(self.dir, "mask.bin")):
            os.remove(os.path.join(self.dir, "mask.bin"))  # stale file from an earlier sft run
        meta = dict(meta, n_rows=len(self.offsets) - 1, n_tokens=int(self.offsets[-1]))
        if self.mask_f is not None:
            meta["n_trained_tokens"] = self.n_trained
        tmp = os.path.join(self.dir, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, os.path.join(self.dir, "meta.json"))  # meta.json last = the split is complete
        return meta


class Packer:
    """Pretraining: concatenate token arrays and cut rows of exactly seq_len."""

    def __init__(self, writer: RowWriter, seq_len: int):
        self.w, self.seq_len = writer, seq_len
        self.parts: list[np.ndarray] = []
        self.n = 0

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(ids)
        self.n += len(ids)
        if self.n >= self.seq_len:
            buf = np.concatenate(self.parts)
            k = len(buf) // self.seq_len * self.seq_len
            for i in range(0, k, self.seq_len):
                self.w.add(buf[i:i + self.seq_len])
            self.parts, self.n = [buf[k:]], len(buf) - k

    def finish(self, drop_remainder: bool) -> int:
        """Write (or drop) the final partial row; returns its length."""
        rest = np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint32)
        if len(rest) and not drop_remainder:
            self.w.add(rest)
        return len(rest)


class SFTRows:
    """SFT: one conversation per row (truncated), or greedy packing of whole conversations."""

    def __init__(self, writer: RowWriter, seq_len: int, pack: bool):
        self.w, self.seq_len, self.pack = writer, seq_len, pack
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.n = 0
        self.truncated = self.no_target = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if len(ids) > self.seq_len:
            ids, mask = ids[:self.seq_len], mask[:self.seq_len]
            self.truncated += 1
        if not mask.any():  # the answer fell beyond seq_len: nothing to learn from this row
            self.no_target += 1
            return
        if not self.pack:
            self.w.add(ids, mask)
            return
        if self.n + len(ids) > self.seq_len:
            self.flush()
        mask = mask.copy()
        mask[0] |= DOC_START  # a packed conversation: positions and attention restart here
        self.ids.append(ids)
        self.masks.append(mask)
        self.n += len(ids)

    def flush(self) -> None:
        if self.ids:
            self.w.add(np.concatenate(self.ids), np.concatenate(self.masks))
        self.ids, self.masks, self.n = [], [], 0


def is_val(i: int, fraction: float) -> bool:
    """Evenly spread, deterministic split: record i goes to val for a `fraction` of all i."""
    return fraction > 0 and math.floor((i + 1) * fraction) > math.floor(i * fraction)


def prepare(inputs: list[str], out_dir: str, kind: str, tokenizer=None, seq_len: int = 512,
            workers: int = 1, skip_invalid: bool = False, pack: bool = False,
            val_fraction: float = 0.0, drop_remainder: bool = False, log=print,
            allow_special_tokens: bool | list[str] = False) -> dict:
    """Tokenize `inputs` into `out_dir` (see module docstring). Returns the train meta dict
    (with "val" holding the val split's meta when val_fraction > 0). Special-token strings in the
    data are encoded as plain text unless `allow_special_tokens` (True or a list of them)."""
    if kind not in ("pretrain", "sft"):
        raise ValueError(f"--kind must be pretrain or sft, got {kind!r}")
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    for p in inputs:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such data file")
    tok_spec = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
    tok = get_tokenizer(tokenizer)
    vocab = len(tok)
    dtype = np.uint16 if vocab < 65536 else np.uint32
    sft = kind == "sft"
    splits = {"train": out_dir}
    if val_fraction > 0:
        splits["val"] = os.path.join(out_dir, "val")
    writers = {s: RowWriter(d, dtype, sft) for s, d in splits.items()}
    rows = {s: (SFTRows(w, seq_len, pack) if sft else Packer(w, seq_len)) for s, w in writers.items()}
    stats = ReadStats()
    t0 = time.time()
    n_rec = Counter()
    n_long = 0
    i = 0
    try:
        for _fmt, _path, _line, ids, mask in encode_stream(inputs, tok, kind, workers, skip_invalid, stats,
                                                          allow_special_tokens):
            split = "val" if is_val(i, val_fraction) else "train"
            i += 1
            n_rec[split] += 1
            n_long += len(ids) > seq_len
            if sft:
                rows[split].add(ids, mask)
            else:
                rows[split].add(ids)
        if stats.n_valid == 0:
            first = f" (first error: {stats.invalid[0]})" if stats.invalid else ""
            raise ValueError(f"{', '.join(inputs)}: no valid records{first}")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    dt = max(time.time() - t0, 1e-9)
    base = {
        "format_version": FORMAT_VERSION, "kind": kind, "seq_len": seq_len, "vocab_size": vocab,
        "dtype": np.dtype(dtype).name, "eos_id": doc_separator_id(tok), "pad_id": pad_id_of(tok),
        "packed": True if not sft else pack,
        "records": dict(stats.counts), "invalid": stats.n_invalid,
        "sources": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in inputs],
        "tokenizer": {"path": str(tok_spec) if tok_spec else getattr(tok, "name_or_path", None) or "bundled",
                      "sha256": tokenizer_fingerprint(tok)},
        "val_fraction": val_fraction,
        "special_token_records": stats.n_special, "allow_special_tokens": allow_special_tokens,
    }
    metas = {}
    for s, r in rows.items():
        extra: dict = {"split": s, "n_records": n_rec[s]}
        if sft:
            r.flush()
            extra.update(truncated=r.truncated, dropped_no_target=r.no_target)
        else:
            rest = r.finish(drop_remainder)
            extra.update(last_row_tokens=rest, dropped_remainder_tokens=rest if drop_remainder else 0)
        metas[s] = writers[s].finish(dict(base, **extra))
    meta = metas["train"]
    n_tok = sum(m["n_tokens"] for m in metas.values())
    mb = stats.n_bytes / 1e6
    log(f"prepared {kind} data -> {out_dir}: {stats.n_valid} records "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(stats.counts.items()))}), {n_tok:,} tokens, "
        f"{meta['n_rows']:,} train rows" + (f", {metas['val']['n_rows']:,} val rows" if "val" in metas else ""))
    log(f"throughput: {mb / dt:.2f} MB/s, {n_tok / dt:,.0f} tokens/s ({mb:.1f} MB in {dt:.1f}s, "
        f"{workers} worker{'s' if workers > 1 else ''})")
    if stats.n_invalid:
        log(f"skipped {stats.n_invalid} invalid records (first: {stats.invalid[0]})")
    if stats.n_special:
        log(special_note(stats, allow_special_tokens))
    if sft:
        tr = sum(m["truncated"] for m in metas.values())
        nt = sum(m["dropped_no_target"] for m in metas.values())
        if tr:
            log(f"truncated {tr} conversations longer than seq_len={seq_len}")
        if nt:
            log(f"dropped {nt} conversations with no assistant token within seq_len={seq_len}")
    else:
        log(f"{n_long} documents longer than seq_len={seq_len} were split across rows (nothing dropped)")
        for s, m in metas.items():
            if m["dropped_remainder_tokens"]:
                log(f"{s}: dropped the final {m['dropped_remainder_tokens']} tokens (< seq_len)")
            elif m["last_row_tokens"]:
                log(f"{s}: last row is shorter ({m['last_row_tokens']} tokens)")
    if "val" in metas:
        meta = dict(meta, val=metas["val"])
    meta["throughput_mb_s"] = mb / dt
    meta["tokens_per_s"] = n_tok / dt
    return meta


# ----------------------------------------------------------------------------- data check

def special_note(stats: ReadStats, allow: bool | list[str]) -> str:
    """One line on the records whose text holds special-token strings, and what was done with them."""
    how = ("kept as control tokens: allow_special_tokens" if allow is True else
           f"plain text except {allow} (allow_special_tokens)" if allow else
           "encoded as plain text; trusted pre-formatted data can opt in with data.allow_special_tokens")
    return f"{stats.n_special} records contain special-token strings (first: {stats.special[0]}); {how}"


def check(paths: list[str], tokenizer=None, seq_len: int = 512, workers: int = 1,
          max_print: int = 50, log=print, allow_special_tokens: bool | list[str] = False) -> dict:
    """Validate files (all records), report invalid lines, special-token strings and token lengths."""
    tok = get_tokenizer(tokenizer)
    per_file: dict[str, ReadStats] = {}
    lengths: dict[str, array] = {}
    trained = Counter()
    from tinylm.data.formats import FORMAT_KINDS
    for p in paths:
        st = per_file[p] = ReadStats()
        first: tuple[str, int] | None = None  # (kind, line) of the file's first valid record
        for fmt, _path, line, ids, mask in encode_stream([p], tok, None, workers, True, st,
                                                              allow_special_tokens):
            k = FORMAT_KINDS[fmt]
            first = first or (k, line)
            if k != first[0]:  # training reads one kind per file (as `data prepare --kind` will)
                st.counts[fmt] -= 1
                st.invalid.append(DataError(p, line, None, f"a {fmt!r} record ({k}) in a file of {first[0]} "
                                                           f"records (first at line {first[1]}): one kind per file"))
                continue
            lengths.setdefault(k, array("q")).append(len(ids))
            if mask is not None:
                trained[k] += int(mask.sum())
    n_invalid = 0
    for p, st in per_file.items():
        fmts = ", ".join(f"{k}: {v}" for k, v in sorted(st.counts.items()) if v) or "none"
        log(f"{p}: {st.n_valid} valid records ({fmts}), {st.n_invalid} invalid, {st.n_bytes / 1e6:.2f} MB")
        for e in st.invalid[:max(0, max_print - n_invalid)]:
            log(f"  {e}")
        n_invalid += st.n_invalid
        if st.n_special:
            log("  " + special_note(st, allow_special_tokens))
    if n_invalid > max_print:
        log(f"  ... and {n_invalid - max_print} more invalid records")
    out: dict = {"valid": sum(len(v) for v in lengths.values()), "invalid": n_invalid,
                 "special_token_records": sum(st.n_special for st in per_file.values()),
                 "special_token_first": next((st.special[0] for st in per_file.values() if st.special), None)}
    for k, arr in lengths.items():
        a = np.frombuffer(arr, dtype=np.int64)
        n_long = int((a > seq_len).sum())
        st = out[k] = dict(n=len(a), min=int(a.min()), mean=float(a.mean()), p50=float(np.percentile(a, 50)),
                           p95=float(np.percentile(a, 95)), max=int(a.max()), total=int(a.sum()),
                           over_seq_len=n_long)
        what = "split across rows when packed" if k == "pretrain" else "truncated"
        log(f"{k} tokens per record: min {st['min']}  mean {st['mean']:.1f}  p50 {st['p50']:.0f}  "
            f"p95 {st['p95']:.0f}  max {st['max']}  (total {st['total']:,} tokens)")
        log(f"  seq_len {seq_len}: {n_long} of {len(a)} records ({100 * n_long / len(a):.1f}%) are longer "
            f"-> {what}")
        if trained[k]:
            st["trained_fraction"] = trained[k] / st["total"]
            log(f"  trained (assistant) tokens: {100 * st['trained_fraction']:.1f}%")
    return out


# ----------------------------------------------------------------------------- CLI

def _cmd_check(args: argparse.Namespace) -> int:
    out = check(args.files, args.tokenizer, args.seq_len, args.workers, args.max_print,
                allow_special_tokens=args.allow_special_tokens)
    return 1 if out["invalid"] else 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    prepare(args.input, args.out, args.kind, args.tokenizer, args.seq_len, args.workers,
            args.skip_invalid, args.pack, args.val_fraction, args.drop_remainder,
            allow_special_tokens=args.allow_special_tokens)
    return 0


def allow_list(value: str) -> bool | list[str]:
    return True if value.strip().lower() in ("all", "true") else [v for v in value.split(",") if v]


def add_allow_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-special-tokens", nargs="?", const=True, default=False, type=allow_list,
                   metavar="TOKENS", help="trusted pre-formatted data: keep special-token strings in the text "
                   "as control tokens (all, or a comma list such as '<answer>,</answer>'); default: plain text")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check, clean and tokenize training data (see docs/data.md)")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{check,prepare,clean}")
    c = dsub.add_parser("check", help="validate data files and print token-length statistics")
    c.add_argument("files", nargs="+", help=".jsonl / .json / .txt files")
    c.add_argument("--tokenizer", default=None, help="tokenizer dir (default: bundled)")
    c.add_argument("--seq-len", type=int, default=512, help="report how many records exceed this")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--max-print", type=int, default=50, help="print at most this many invalid records")
    add_allow_flag(c)
    c.set_defaults(func=_cmd_check)
    q = dsub.add_parser("prepare", help="tokenize into memory-mapped tokens.bin/mask.bin/offsets.npy")
    q.add_argument("--input", nargs="+", required=True, help=".jsonl / .json / .txt files")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--kind", required=True, choices=["pretrain", "sft"])
    q.add_argument("--tokenizer", default=None, help="tokenizer dir (default: bundled)")
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 1))))
    q.add_argument("--skip-invalid", action="store_true", help="skip (and count) bad records instead of stopping")
    q.add_argument("--pack", action="store_true", help="sft: pack several conversations per row")
    q.add_argument("--val-fraction", type=float, default=0.0, help="fraction of records for DIR/val")
    q.add_argument("--drop-remainder", action="store_true",
                   help="pretrain: drop the final partial row instead of keeping it shorter")
    add_allow_flag(q)
    q.set_defaults(func=_cmd_prepare)
    from tinylm.data.clean import add_cli as add_clean_cli
    add_clean_cli(dsub)

