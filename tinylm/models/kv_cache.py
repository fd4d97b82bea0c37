"""Preallocated (static) key/value cache for decoding.

Why static: growing the cache with `torch.cat` at every step copies the whole cache each time
(O(T^2) memory traffic) and fragments the allocator; a buffer allocated once and written in place
costs O(1) per step and keeps shapes fixed (friendly to CUDA graphs / torch.compile).

Each cache row ("slot") has its own length, so rows can hold sequences of different lengths and
a finished row can be reset and reused by a new request while others keep decoding (continuous
batching, as in vLLM / Orca [Yu et al. 2022]).
"""

from __future__ import annotations

import torch

from tinylm.models.config import TinyLMConfig


class StaticKVCache:
    """K/V buffers of shape (B, n_kv_heads, max_seq_len, head_dim) per layer and `seq_lens` (B,)."""

    def __init__(
        self,
        config: TinyLMConfig,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dtype = dtype or torch.float32
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        v_shape = shape
        if getattr(config, "attention", "gqa") == "mla":  # MLA (mla.py): keys = [latent c_kv ; RoPE key], no values
            shape = (batch_size, 1, max_seq_len, config.kv_lora_rank + config.qk_rope_head_dim)
            v_shape = (batch_size, 1, max_seq_len, 0)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.seq_lens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        # Set by the model for the duration of one forward pass (see `begin`).
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._kv_len = 0
        self._all_rows = False
        self._slice_start: int | None = None

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget the content of `rows` (all rows when None). The buffers are reused, not freed."""
        if rows is None:
            self.seq_lens.zero_()
        else:
            self.seq_lens[torch.as_tensor(rows, dtype=torch.long, device=self.seq_lens.device)] = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.seq_lens.max().item()) if self.batch_size else 0

    # -- used by the model during a forward pass ----------------------------------------------
    def begin(self, rows: torch.Tensor, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a forward pass writing `num_new` tokens to `rows`.

        Returns (positions (b, T) of the new tokens, key_valid (b, T, S) boolean mask) where S is the
        number of cache positions attended to. Query i of row r sees key j iff j <= seq_lens[r] + i.
        """
        past = self.seq_lens[rows]  # (b,)
        lo, hi = (int(v) for v in torch.stack(past.aminmax()).tolist())
        kv_len = hi + num_new
        if kv_len > self.max_seq_len:
            raise ValueError(f"KV cache overflow: need {kv_len} positions, cache holds {self.max_seq_len}")
        positions = past[:, None] + torch.arange(num_new, device=past.device)[None, :]  # (b, T)
        key_pos = torch.arange(kv_len, device=past.device)
        key_valid = key_pos[None, None, :] <= positions[:, :, None]  # (b, T, S)
        self._rows, self._positions, self._kv_len = rows, positions, kv_len
        # All rows in order: return views of the buffers instead of gathered copies.
        self._all_rows = rows.numel() == self.batch_size and bool(
            (rows == torch.arange(self.batch_size, device=rows.device)).all())
        # All rows at the same length (always so at batch 1): the write is one slice copy per buffer.
        self._slice_start = lo if self._all_rows and lo == hi else None
        return positions, key_valid

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new key/value (b, n_kv, T, D) in place; return this layer's (b, n_kv, S, D) view."""
        rows, positions = self._rows, self._positions
        assert rows is not None and positions is not None, "call begin() first"
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        b, _, t, _ = key.shape
        if self._slice_start is not None:
            p = self._slice_start
            k_buf[:, :, p:p + t] = key
            v_buf[:, :, p:p + t] = value
            return k_buf[:, :, : self._kv_len], v_buf[:, :, : self._kv_len]  # views, no copy
        # Advanced-index write: buffer[row, :, pos, :] = new[:, :, i, :] for every (row, i).
        r_idx = rows[:, None].expand(b, t)
        k_buf[r_idx, :, positions] = key.transpose(1, 2).to(k_buf.dtype)
        v_buf[r_idx, :, positions] = value.transpose(1, 2).to(v_buf.dtype)
        if self._all_rows:
            return k_buf[:, :, : self._kv_len], v_buf[:, :, : self._kv_len]  # views, no copy
        return k_buf[rows, :, : self._kv_len], v_buf[rows, :, : self._kv_len]

    def end(self, num_real_new: torch.Tensor) -> None:
        """Advance the lengths of the rows written by this pass by their number of real tokens."""
        assert self._rows is not None
        self.seq_lens[self._rows] += num_real_new.to(self.seq_lens.dtype)
        self._rows, self._positions = None, None
