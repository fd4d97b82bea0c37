"""Read prepared token files and serve deterministic, resumable, DDP-sharded batches.

`TokenDataset` memory-maps what `tinylm data prepare` wrote (tokens.bin / mask.bin /
offsets.npy), so a 10 GB corpus costs no RAM and opening it is instant (the nanoGPT approach).

`BatchIterator` defines one global order per epoch (a seeded permutation, Fisher-Yates via
numpy) and cuts it into global batches of `batch_size * world_size` rows; rank r takes rows
r::world_size of each global batch, so ranks never overlap and together see every row once.
Its state is just (epoch, position): saving it in a checkpoint and loading it back reproduces
exactly the same future batches, which makes a resumed run bit-identical to an uninterrupted one.

SFT rows have different lengths, so batches are padded dynamically to the longest row in the
batch (not to seq_len): labels are -100 on padding and on non-assistant tokens, and an
attention_mask marks the real tokens. Packed SFT rows (`--pack`, `data.packing`) also get
position_ids that restart at each conversation; the model turns a restart into a block-diagonal
causal mask (transformers' packed-sequence convention), so packing changes speed, not the loss.

`load_token_dataset` lets a recipe point at a raw .jsonl: it is prepared once into a cache
directory keyed by the file contents, tokenizer and settings, then memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch

IGNORE_INDEX = -100


class TokenDataset(torch.utils.data.Dataset):
    """Memory-mapped rows of a prepared directory. ds[i] -> dict(input_ids, labels) int64 (L,)."""

    def __init__(self, path: str, split: str = "train"):
        path = str(path)
        d = path if split == "train" else os.path.join(path, split)
        meta_path = os.path.join(d, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path}: not a prepared dataset (run `tinylm data prepare`)")
        with open(meta_path) as f:
            self.meta: dict = json.load(f)
        self.dir = d
        self.kind: str = self.meta["kind"]
        self.seq_len: int = int(self.meta["seq_len"])
        self.pad_id: int = int(self.meta["pad_id"])
        self.eos_id: int = int(self.meta["eos_id"])
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.offsets = np.load(os.path.join(d, "offsets.npy"))  # (n_rows + 1,) int64
        self.tokens = _memmap(os.path.join(d, "tokens.bin"), np.dtype(self.meta["dtype"]))
        mask_path = os.path.join(d, "mask.bin")
        self.mask = _memmap(mask_path, np.uint8) if os.path.exists(mask_path) else None
        if len(self.tokens) != self.offsets[-1]:
            raise ValueError(f"{d}: tokens.bin has {len(self.tokens)} tokens but offsets.npy says "
                             f"{self.offsets[-1]}; the directory is corrupt, prepare it again")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids, mask) numpy arrays of row i (mask None for pretraining = train every token)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], (None if self.mask is None else self.mask[a:b])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.row(i)
        input_ids = torch.from_numpy(ids.astype(np.int64))
        labels = input_ids.clone()
        if mask is not None:
            labels[torch.from_numpy((mask & 1) == 0)] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


def _memmap(path: str, dtype: np.dtype) -> np.ndarray:
    if os.path.getsize(path) == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def collate(dataset: TokenDataset, indices: list[int] | np.ndarray, seq_len: int | None = None) -> dict:
    """Pad rows to the longest in the batch (<= seq_len). Returns input_ids, labels,
    attention_mask (B, T) int64 tensors and n_tokens / n_targets ints (real tokens, and label
    positions the shifted loss will count)."""
    rows = [dataset.row(int(i)) for i in indices]
    if seq_len is not None:
        rows = [(ids[:seq_len], None if m is None else m[:seq_len]) for ids, m in rows]
    T = max(1, max(len(ids) for ids, _ in rows))
    B = len(rows)
    input_ids = torch.full((B, T), dataset.pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    packed = any(m is not None and bool((m & 2).any()) for _, m in rows)
    position_ids = torch.zeros((B, T), dtype=torch.long) if packed else None
    for b, (ids, m) in enumerate(rows):
        n = len(ids)
        x = torch.from_numpy(ids.astype(np.int64))
        input_ids[b, :n] = x
        attention_mask[b, :n] = 1
        labels[b, :n] = x if m is None else torch.where(torch.from_numpy((m & 1).astype(bool)), x, IGNORE_INDEX)
        if position_ids is not None:  # restart at each packed conversation (mask bit 1)
            idx = np.arange(n)
            start_of = np.maximum.accumulate(np.where(m & 2, idx, 0)) if m is not None else 0
            position_ids[b, :n] = torch.from_numpy(idx - start_of)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "n_tokens": int(attention_mask.sum()), "n_targets": int((labels[:, 1:] != IGNORE_INDEX).sum())}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


class BatchIterator:
    """Deterministic, resumable, DDP-aware batches over a TokenDataset.

    batch_size is per rank (micro-batch rows); one global batch = batch_size * world_size rows.
    Iterating never ends: after the last full global batch of an epoch the next epoch starts
    with a new permutation (seed, epoch). `epoch`/`position` tell where you are; `len()` is the
    number of batches per epoch. Leftover rows (< one global batch) are skipped for that epoch
    (they are in different positions next epoch), so all ranks take the same number of steps.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int | None = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError(f"{dataset.dir}: dataset has no rows")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.ds, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.global_batch = batch_size * world_size
        if seq_len is not None and seq_len < dataset.seq_len and dataset.kind == "pretrain":
            print(f"warning: {dataset.dir} was packed with seq_len={dataset.seq_len}; rows are cut to "
                  f"{seq_len} and the rest of each row is unused (prepare it again with --seq-len {seq_len})",
                  file=sys.stderr)
        self.epoch = 0
        self.position = 0  # global batches already served in this epoch
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return max(1, len(self.ds) // self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """Global row order of an epoch (same on every rank)."""
        if self._order_epoch != epoch:
            n = len(self.ds)
            if self.shuffle:
                o = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                o = np.arange(n)
            if n < self.global_batch:  # tiny dataset: repeat rows to fill one global batch
                o = np.resize(o, self.global_batch)
            self._order_epoch, self._order = epoch, o
        return self._order

    def next_batch(self) -> dict:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        gb = self.global_batch
        g = self.order(self.epoch)[self.position * gb:(self.position + 1) * gb]
        self.position += 1
        return collate(self.ds, g[self.rank::self.world_size], self.seq_len)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "global_batch": self.global_batch, "n_rows": len(self.ds), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_rows", len(self.ds)) != len(self.ds):
            print(f"warning: resuming on a dataset with {len(self.ds)} rows (was {state['n_rows']}); "
                  "the batch order differs", file=sys.stderr)
        self.seed = state.get("seed", self.seed)
        self.shuffle = state.get("shuffle", self.shuffle)
        self.epoch = int(state["epoch"])
        gb_old = int(state.get("global_batch", self.global_batch))
        # rows consumed is what matters; a new world_size with the same global batch is exact
        self.position = int(state["position"]) * gb_old // self.global_batch
        self._order_epoch = -1


# ----------------------------------------------------------------------------- raw file -> cached dataset

def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> str:
    return os.environ.get("TINYLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinylm")


def load_token_dataset(source, tokenizer=None, kind: str = "pretrain", seq_len: int = 512,
                       split: str = "train", val_fraction: float = 0.0, pack: bool = False,
                       skip_invalid: bool = False, workers: int = 1, cache_dir: str | None = None,
                       allow_special_tokens: bool | list[str] = False) -> TokenDataset:
    """A TokenDataset from a prepared directory, or from raw data file(s) (.jsonl/.json/.txt),
    which are prepared once into `cache_dir` (default $TINYLM_CACHE or ~/.cache/tinylm, under
    data/<hash of file contents + tokenizer + kind + seq_len + pack + skip_invalid + val_fraction +
    allow_special_tokens>).
    tokenizer: object, directory, or None for the bundled one."""
    from tinylm.data.prepare import FORMAT_VERSION, get_tokenizer, prepare, tokenizer_fingerprint

    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        ds = TokenDataset(source, split)
        want = "sft" if kind in ("sft", "chat") else kind
        if ds.kind != want:
            raise ValueError(f"{source}: prepared as {ds.kind!r} data but {want!r} was requested")
        return ds
    files = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
    for p in files:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such data file or prepared directory")
    kind = "sft" if kind == "chat" else kind
    tok = get_tokenizer(tokenizer)
    key_src = json.dumps([FORMAT_VERSION, [file_sha256(p) for p in files], tokenizer_fingerprint(tok),
                          kind, seq_len, pack, skip_invalid, val_fraction, allow_special_tokens])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    d = os.path.join(cache_dir or os.path.join(cache_root(), "data"), key)
    os.makedirs(os.path.dirname(d), exist_ok=True)
    with open(d + ".lock", "w") as lock:
        try:  # DDP ranks on one machine: one prepares, the others wait for it
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): each process prepares, the first rename wins
            pass
        cached = os.path.isfile(os.path.join(d, "meta.json"))
        if not cached:
            tmp = f"{d}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"preparing {', '.join(files)} -> {d}", file=sys.stderr)
            prepare(files, tmp, kind, tok, seq_len=seq_len, workers=workers, skip_invalid=skip_invalid,
                    pack=pack, val_fraction=val_fraction, log=lambda s: print(s, file=sys.stderr),
                    allow_special_tokens=allow_special_tokens)
            try:
                os.rename(tmp, d)  # atomic: readers never see a half-written directory
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
    ds = TokenDataset(d, split)
    if cached and split == "train" and ds.meta.get("invalid"):  # say it again on every run, never silently
        print(f"note: {ds.meta['invalid']} invalid records of {', '.join(files)} were skipped when it was "
              "prepared (skip_invalid); `tinylm data check` lists them", file=sys.stderr)
    return ds
