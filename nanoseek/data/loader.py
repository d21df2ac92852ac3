"""Batches of packed token rows from a data folder, shuffled from a seed, resumable exactly.

Each epoch lays the split's documents out in an order (a permutation drawn from (seed, epoch) when
shuffling, storage order otherwise) and cuts that layout into rows of T+1 tokens:
- stream packing (default, pretraining): the documents are concatenated and row r is the window
  [r T, r T + T + 1) (consecutive rows share one token, so every token is a target once); rows may
  start or end inside a document.
- whole-document packing (`whole_documents=True`, SFT): documents are packed greedily in order into
  rows without splitting, the rest of a row is padding (loss-masked); a document longer than T + 1
  is truncated.
Rows are then visited in a permuted order (again from (seed, epoch)). Rows are numbered globally
across epochs; the loader's whole state is how many rows all ranks consumed, so `state_dict()` is a
small JSON-able dict and `load_state_dict` resumes with exactly the batches that would have come.
With `world_size` W, batch k of rank r holds global rows [k B W + r B, k B W + (r + 1) B).

Every batch carries, per token, the loss mask (chat data: assistant replies only), a segment id
(0, 1, 2, ... for each document piece in its row; -1 on padding) and the position within its segment,
so a trainer can keep attention and positions inside each example (the model takes the segment ids
and builds the mask: `nanoseek.model.attention.segment_mask`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import DataError
from ..tokenizer import Tokenizer
from .shards import MANIFEST, check_tokenizer, check_vocab, manifest_hash, open_split, read_manifest

STATE_VERSION = 1


@dataclass
class Batch:
    """B rows of T + 1 tokens; inputs are tokens[:, :-1] and targets tokens[:, 1:]."""

    tokens: torch.Tensor       # (B, T+1) int64
    loss_mask: torch.Tensor    # (B, T+1) bool: the token is a training target
    segment_ids: torch.Tensor  # (B, T+1) int64: document piece within the row, 0, 1, ...; -1 padding
    positions: torch.Tensor    # (B, T+1) int64: position within its segment (0 at each piece start)

    @property
    def inputs(self) -> torch.Tensor:  # (B, T)
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:  # (B, T)
        return self.tokens[:, 1:]

    @property
    def target_mask(self) -> torch.Tensor:  # (B, T): the loss counts targets[b, t] where True
        return self.loss_mask[:, 1:]

    @property
    def input_segments(self) -> torch.Tensor:  # (B, T)
        return self.segment_ids[:, :-1]

    @property
    def input_positions(self) -> torch.Tensor:  # (B, T): RoPE positions restarting per example
        return self.positions[:, :-1]

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.tokens, self.loss_mask, self.segment_ids, self.positions)))


class TokenLoader:
    """Endless (B, T+1) batches from one split of a data folder written by `nanoseek data prepare`.

    vocab_size: the model's; data with larger ids raises DataError (at open, and per batch).
    tokenizer: when given, the data must have been tokenized with it.
    """

    def __init__(self, folder: str | Path, split: str = "train", *, batch_size: int, seq_len: int,
                 seed: int = 0, shuffle: bool = True, whole_documents: bool = False,
                 vocab_size: int | None = None, tokenizer: Tokenizer | None = None,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.folder, self.split = Path(folder), split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.shuffle, self.whole_documents = shuffle, whole_documents
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self.manifest = read_manifest(folder)
        if vocab_size is not None:
            check_vocab(folder, self.manifest, vocab_size)
        if tokenizer is not None:
            check_tokenizer(folder, self.manifest, tokenizer)
        self.data = open_split(folder, split, self.manifest)
        self.pad_id = self.manifest["tokenizer"]["pad_id"]
        self._stream_rows = (self.data.num_tokens - 1) // seq_len  # rows per epoch, stream packing
        if not whole_documents and self._stream_rows == 0:
            raise DataError(f"{self.folder / MANIFEST}: the {split!r} split holds {self.data.num_tokens} "
                            f"tokens, too few for one row of seq_len + 1 = {seq_len + 1}")
        if len(self.data.doc_len) == 0:
            raise DataError(f"{self.folder / MANIFEST}: the {split!r} split has no documents")
        self.rows_consumed = 0            # global rows, all ranks together
        self._layouts: dict[int, _Layout] = {}
        self._epoch_ends: list[int] = []  # global row where epochs 0, 1, ... end (whole documents)

    # -- position ---------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._locate(self.rows_consumed)[0]

    @property
    def rows_per_epoch(self) -> int:
        """Rows in epoch 0 (every epoch has as many with stream packing)."""
        return self._layout(0).num_rows if self.whole_documents else self._stream_rows

    def state_dict(self) -> dict:
        """The position, plus what must match to resume: plain JSON types only."""
        return {"version": STATE_VERSION, "data": manifest_hash(self.manifest), "split": self.split,
                "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "whole_documents": self.whole_documents, "rows_consumed": self.rows_consumed,
                "epoch": self.epoch, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. The data, split, seq_len, seed and packing must match (DataError
        naming the field); batch_size and world_size may change (rows simply continue)."""
        for key in ("version", "data", "split", "seq_len", "seed", "shuffle", "whole_documents"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                what = "data folder content" if key == "data" else key
                raise DataError(f"cannot resume the data loader: saved {what} {state.get(key)!r} differs "
                                f"from this loader's {mine!r}")
        rows = state.get("rows_consumed")
        if not isinstance(rows, int) or rows < 0:
            raise DataError(f"cannot resume the data loader: bad rows_consumed {rows!r}")
        self.rows_consumed = rows

    # -- batches ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def next_batch(self) -> Batch:
        """This rank's next B rows; advances the position by B x world_size rows."""
        first = self.rows_consumed + self.rank * self.batch_size
        batch = self._gather([self._locate(g) for g in range(first, first + self.batch_size)])
        self.rows_consumed += self.batch_size * self.world_size
        return batch

    def epoch_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """One pass over epoch 0's rows in the loader's order (for validation, with shuffle=False),
        this rank's share, the last batch possibly smaller; the training position is untouched."""
        rows = self.rows_per_epoch
        step = self.batch_size * self.world_size
        for k, first in enumerate(range(self.rank * self.batch_size, rows, step)):
            if max_batches is not None and k >= max_batches:
                return
            yield self._gather([(0, r) for r in range(first, min(first + self.batch_size, rows))])

    # -- internals --------------------------------------------------------------------------------
    def _layout(self, epoch: int) -> "_Layout":
        if epoch not in self._layouts:
            if len(self._layouts) >= 2:  # a batch rarely spans more than two epochs
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = _Layout(self, epoch)
        return self._layouts[epoch]

    def _locate(self, g: int) -> tuple[int, int]:
        """Global row g -> (epoch, row within that epoch)."""
        if not self.whole_documents:  # every epoch has the same number of rows
            return divmod(g, self._stream_rows)
        while not self._epoch_ends or self._epoch_ends[-1] <= g:  # row counts vary: add epochs
            self._epoch_ends.append((self._epoch_ends[-1] if self._epoch_ends else 0)
                                    + self._layout(len(self._epoch_ends)).num_rows)
        epoch = bisect.bisect_right(self._epoch_ends, g)
        return epoch, g - (self._epoch_ends[epoch - 1] if epoch else 0)

    def _gather(self, rows: list[tuple[int, int]]) -> Batch:
        """Copy the given (epoch, row) rows out of the shards into one Batch."""
        shape = (len(rows), self.seq_len + 1)
        tokens = np.full(shape, self.pad_id, np.int64)
        mask = np.zeros(shape, bool)
        segments = np.full(shape, -1, np.int64)
        positions = np.zeros(shape, np.int64)
        for b, (epoch, r) in enumerate(rows):
            col = 0
            for seg, (doc, offset, length) in enumerate(self._layout(epoch).pieces(r)):
                self._copy_piece(doc, offset, length, tokens[b, col:col + length], mask[b, col:col + length])
                segments[b, col:col + length] = seg
                positions[b, col:col + length] = np.arange(length)
                col += length
        return Batch(*(torch.from_numpy(a) for a in (tokens, mask, segments, positions)))

    def _copy_piece(self, doc: int, offset: int, length: int, tokens_out: np.ndarray, mask_out: np.ndarray):
        """tokens_out, mask_out (length,) <- document `doc` from `offset`."""
        shard = int(self.data.doc_shard[doc])
        start = int(self.data.doc_start[doc]) + offset
        piece = self.data.tokens[shard][start:start + length]
        if self.vocab_size is not None and length and int(piece.max()) >= self.vocab_size:
            bad = start + int(np.argmax(piece >= self.vocab_size))
            raise DataError(f"{self.data.files[shard]}: token id {int(self.data.tokens[shard][bad])} at "
                            f"offset {bad} is beyond the model's vocab_size {self.vocab_size}")
        tokens_out[:] = piece
        masks = self.data.masks[shard]
        mask_out[:] = True if masks is None else masks[start:start + length]


class _Layout:
    """One epoch's document order and its rows. pieces(r) -> [(doc, offset, length)] filling row r."""

    def __init__(self, loader: TokenLoader, epoch: int):
        data, T = loader.data, loader.seq_len
        self.row_len = T + 1
        self.whole = loader.whole_documents
        rng = np.random.default_rng([loader.seed, epoch])
        n_docs = len(data.doc_len)
        self.order = rng.permutation(n_docs) if loader.shuffle else np.arange(n_docs)
        lens = data.doc_len[self.order]
        if self.whole:
            self.lens = np.minimum(lens, self.row_len)
            self.row_first = _pack_greedy(self.lens, self.row_len)  # (R + 1,) into order
            self.num_rows = len(self.row_first) - 1
        else:
            self.ends = np.cumsum(lens)               # (D,) stream offset where each document ends
            self.num_rows = (int(self.ends[-1]) - 1) // T
            self.stride = T
        self.row_order = rng.permutation(self.num_rows) if loader.shuffle else np.arange(self.num_rows)

    def pieces(self, r: int) -> list[tuple[int, int, int]]:
        r = int(self.row_order[r])
        if self.whole:
            return [(int(self.order[j]), 0, int(self.lens[j]))
                    for j in range(self.row_first[r], self.row_first[r + 1])]
        a, b = r * self.stride, r * self.stride + self.row_len  # stream window [a, b)
        out = []
        j = int(np.searchsorted(self.ends, a, side="right"))
        while a < b:
            doc_begin = int(self.ends[j - 1]) if j else 0
            end = min(b, int(self.ends[j]))
            out.append((int(self.order[j]), a - doc_begin, end - a))
            a, j = end, j + 1
        return out


def _pack_greedy(lens: np.ndarray, capacity: int) -> np.ndarray:
    """Row boundaries for packing documents of `lens` in order, a new row whenever the next document
    does not fit: returns (R + 1,) indices, row k holding documents [first[k], first[k + 1])."""
    first, used = [0], 0
    for j, n in enumerate(lens.tolist()):
        if used + n > capacity:
            first.append(j)
            used = 0
        used += n
    first.append(len(lens))
    return np.asarray(first, np.int64)
