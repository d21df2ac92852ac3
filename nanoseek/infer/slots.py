"""Slot memory of the running rows: one preallocated MLA latent cache shared by the whole batch.

Running sequences are the rows 0..n-1 of `kv: (layers, max_batch, slots, kv_lora_rank + qk_rope)`. All
rows write their next token into the same slot (`length`), so one decode step is one forward of (n, 1)
tokens; `valid` (max_batch, slots) masks the slots a row does not own: the left part before it joined,
and drafts it rejected. A prefilled request joins with its cache rows copied right-aligned to
`length`. A finished or cancelled row is replaced by the last row, so the running rows stay a prefix.
When slots run out, `compact` packs each row's valid slots to the right and drops the holes; the cache
grows (doubling) up to `max_slots`.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import LatentCache
from .request import Request


class CacheView(LatentCache):
    """The first n rows of the slot storage, seen by the model as a LatentCache."""

    def __init__(self, kv: torch.Tensor, valid: torch.Tensor, length: int, kv_lora_rank: int):
        self.kv, self.valid, self.length, self.kv_lora_rank = kv, valid, length, kv_lora_rank
        self.padded = True  # always build the (B, T, S) mask from `valid`
        self.max_len = kv.shape[2]


class Slots:
    """The running requests (`rows`, index = cache row) and their cache. `stats` is the engine's
    counter dict ("compactions")."""

    def __init__(self, config: ModelConfig, n_layers: int, max_batch: int, max_slots: int, device, dtype,
                 stats: dict):
        self.kv_lora_rank = config.kv_lora_rank
        self.width = config.kv_lora_rank + config.qk_rope_head_dim
        self.n_layers, self.max_batch, self.max_slots = n_layers, max_batch, max_slots
        self.device, self.dtype = device, dtype
        self.stats = stats
        self.rows: list[Request] = []
        self.kv: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.length = 0

    @property
    def size(self) -> int:
        """Slots allocated per row."""
        return 0 if self.kv is None else self.kv.shape[2]

    def view(self) -> CacheView:
        """The running rows' cache, to write the next tokens at slot `length` (read `length` back after)."""
        n = len(self.rows)
        return CacheView(self.kv[:, :n], self.valid[:n], self.length, self.kv_lora_rank)

    def clear(self):
        self.rows.clear()
        self.length = 0

    def ensure_room(self, T: int):
        """Before writing T tokens at `length`: compact the holes away, grow if still short."""
        if self.length + T <= self.size:
            return
        self.compact()
        if self.length + T > self.size * 3 // 4 and self.size < self.max_slots:
            self._reserve(min(self.max_slots, 2 * self.size))
        self._reserve(self.length + T)

    def compact(self):
        """Right-align every row's valid slots, dropping padding and rejected drafts."""
        n, L = len(self.rows), self.length
        if n == 0:
            self.length = 0
            return
        valid = self.valid[:n, :L]
        new_len = int(valid.sum(dim=1).max())
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, L - new_len:]  # (n, new_len)
        kv = self.kv[:, :n, :L]
        index = order[None, :, :, None].expand(self.n_layers, n, new_len, self.width)
        self.kv[:, :n, :new_len] = torch.gather(kv, 2, index)
        self.valid[:n, :new_len] = torch.gather(valid, 1, order)
        self.length = new_len
        self.stats["compactions"] += 1

    def join(self, req: Request, rows: torch.Tensor):
        """Add a prefilled request as row n: its cache rows (layers, P, width) end at slot `length`."""
        P, n = rows.shape[1], len(self.rows)
        if n == 0:
            self.length = 0
        if max(self.length, P) + 2 > self.max_slots:  # holes (left padding, rejected drafts) fill the slots
            self.compact()
        self._reserve(max(self.length, P) + 2)
        if P > self.length:  # shift everyone right to make room on the left
            shift, L = P - self.length, self.length
            if n and L:
                self.kv[:, :n, shift:shift + L] = self.kv[:, :n, :L].clone()
                self.valid[:n, shift:shift + L] = self.valid[:n, :L].clone()
            self.valid[:n, :shift] = False
            self.length = P
        L = self.length
        self.kv[:, n, L - P:L] = rows
        self.valid[n, : L - P] = False
        self.valid[n, L - P:L] = True
        self.rows.append(req)

    def remove(self, indices: list[int]):
        """Free finished rows: the last row moves into each freed one (rows stay a prefix)."""
        L = self.length
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.kv[:, i, :L] = self.kv[:, last, :L]
                self.valid[i, :L] = self.valid[last, :L]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.length = 0

    def _allocate(self, slots: int):
        """(Re)allocate the cache with `slots` slots, keeping the first `length` of every row."""
        kv = torch.zeros(self.n_layers, self.max_batch, slots, self.width, device=self.device, dtype=self.dtype)
        valid = torch.zeros(self.max_batch, slots, device=self.device, dtype=torch.bool)
        if self.kv is not None and self.length:
            kv[:, :, : self.length] = self.kv[:, :, : self.length]
            valid[:, : self.length] = self.valid[:, : self.length]
        self.kv, self.valid = kv, valid

    def _reserve(self, needed: int):
        """Make the cache at least `needed` slots long (doubling, capped at max_slots)."""
        if needed > self.size:
            if needed > self.max_slots:
                raise RuntimeError(f"cache overflow: {needed} slots needed, at most {self.max_slots}")
            self._allocate(min(self.max_slots, max(needed, 2 * self.size, 64)))
