"""Token shards on disk: documents -> numbered flat token files + a JSON manifest, and back.

Layout of a data folder (every file raw little-endian, memory-mappable with numpy, no pickle):
  manifest.json                what follows, plus dtype, vocab size, tokenizer hash, token counts
  {split}-{k:05d}.bin          token ids, uint16 when the vocab fits in 16 bits, else uint32
  {split}-{k:05d}.docs.bin     int64 start offset of every document in that shard (document i spans
                               starts[i]:starts[i+1], the last one runs to the end of the shard)
  {split}-{k:05d}.mask.bin     uint8 loss mask, 1 where a token is a training target (chat data only:
                               assistant replies; a shard without it trains on every token)
A document never spans two shards. Text documents are stored as BOS + text + EOS; chat documents as
the R1 chat template renders them (BOS first, every assistant turn closed by EOS).

The folder is built under a temporary name and renamed into place when complete: an error or a crash
never leaves a half-written data folder, and an existing one is only replaced with `overwrite=True`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from ..runio import staged_dir
from ..tokenizer import Tokenizer
from .sources import Document, check_input, input_size, read_documents

MANIFEST = "manifest.json"
FORMAT = "nanoseek-token-shards"
VERSION = 1
SHARD_TOKENS = 100_000_000  # ~200 MB of uint16 per shard
BATCH_CHARS = 1 << 20       # characters encoded per tokenizer call (parallel in Rust)
DOCS_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32; little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---- writing -----------------------------------------------------------------------------------
class ShardWriter:
    """Appends the documents of one split to `{split}-{k:05d}.bin` files of about `shard_tokens` each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.loss_tokens = 0
        self._open_next()

    def _open_next(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self.shards.append({"file": f"{name}.bin", "docs_file": f"{name}.docs.bin", "mask_file": None,
                            "num_tokens": 0, "num_documents": 0})
        self.tokens = open(self.folder / f"{name}.bin", "wb")
        self.starts: list[int] = []
        self.mask = None  # opened at this shard's first chat document

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        """Append one document: ids (L,), mask (L,) bool or None for 'every token is a target'."""
        shard = self.shards[-1]
        if shard["num_tokens"] >= self.shard_tokens:
            self._close_shard()
            self._open_next()
            shard = self.shards[-1]
        if mask is not None and self.mask is None:
            shard["mask_file"] = shard["file"].replace(".bin", ".mask.bin")
            self.mask = open(self.folder / shard["mask_file"], "wb")
            self.mask.write(np.ones(shard["num_tokens"], MASK_DTYPE).tobytes())  # earlier text documents
        self.starts.append(shard["num_tokens"])
        self.tokens.write(ids.astype(self.dtype).tobytes())
        if self.mask is not None:
            m = np.ones(len(ids), MASK_DTYPE) if mask is None else mask.astype(MASK_DTYPE)
            self.mask.write(m.tobytes())
        self.loss_tokens += len(ids) if mask is None else int(mask.sum())
        shard["num_tokens"] += len(ids)
        shard["num_documents"] += 1

    def abort(self) -> None:
        """Close the open files without finishing the shard (after an error: the folder is deleted)."""
        self.tokens.close()
        if self.mask is not None:
            self.mask.close()

    def _close_shard(self) -> None:
        self.abort()
        np.asarray(self.starts, DOCS_DTYPE).tofile(self.folder / self.shards[-1]["docs_file"])

    def close(self) -> dict:
        """Finish the last shard; the split's entry for the manifest."""
        self._close_shard()
        return {"tokens": sum(s["num_tokens"] for s in self.shards),
                "documents": sum(s["num_documents"] for s in self.shards),
                "loss_tokens": self.loss_tokens, "shards": self.shards}


def encode_documents(tokenizer: Tokenizer, docs: Iterable[Document],
                     batch_chars: int = BATCH_CHARS) -> Iterator[tuple[Document, np.ndarray, np.ndarray | None]]:
    """(doc, ids (L,), mask (L,) or None) for each document, in order. Text chunks and chat
    conversations are queued and encoded together once about `batch_chars` characters wait."""
    queue: list[tuple[Document, str | None]] = []  # (doc, text chunk), or (doc, None) ending a document
    parts: list[list[int]] = []                    # encoded chunks of the unfinished text document
    size = 0
    for doc in docs:
        if doc.messages is not None:
            queue.append((doc, None))
            size += sum(len(m["content"]) + len(m.get("reasoning_content") or "") for m in doc.messages)
        else:
            for chunk in doc.chunks:
                queue.append((doc, chunk))
                size += len(chunk)
                if size >= batch_chars:
                    yield from _flush(tokenizer, queue, parts)
                    size = 0
            queue.append((doc, None))
        if size >= batch_chars:
            yield from _flush(tokenizer, queue, parts)
            size = 0
    yield from _flush(tokenizer, queue, parts)


def _flush(tokenizer: Tokenizer, queue: list, parts: list[list[int]]):
    """Encode the queue; yield the documents it completes: text as BOS + text + EOS (mask None),
    chat as the template renders it, with its assistant mask."""
    texts = iter(tokenizer.encode_batch([chunk for _, chunk in queue if chunk is not None]))
    chats = iter(tokenizer.encode_chats([doc.messages for doc, _ in queue if doc.messages is not None]))
    done = []
    for doc, chunk in queue:
        if chunk is not None:
            parts.append(next(texts))
        elif doc.messages is not None:
            ids, mask = next(chats)
            done.append((doc, np.asarray(ids, np.int64), np.asarray(mask, bool)))
        else:
            ids = np.concatenate([[tokenizer.bos_id], *parts, [tokenizer.eos_id]]).astype(np.int64)
            done.append((doc, ids, None))
            parts.clear()
    queue.clear()
    yield from done


def assign_splits(docs: Iterable[Document], val_fraction: float) -> Iterator[Document]:
    """Send every (1/val_fraction)-th document to "val" (evenly spaced, deterministic, streaming):
    document i is in val when floor((i+1) f) > floor(i f)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    for i, doc in enumerate(docs):
        doc.split = "val" if math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction) else "train"
        yield doc


def write_shards(tokenizer: Tokenizer, docs: Iterable[Document], folder: Path, *,
                 shard_tokens: int = SHARD_TOKENS, extra: dict | None = None) -> dict:
    """Tokenize `docs` (each with its split) into shards in `folder` and write the manifest; returns it.
    `extra` is merged into the manifest (sources, recipe name)."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers: dict[str, ShardWriter] = {}
    max_id = -1
    try:
        for doc, ids, mask in encode_documents(tokenizer, docs):
            if doc.split not in writers:
                writers[doc.split] = ShardWriter(folder, doc.split, dtype, shard_tokens)
            writers[doc.split].add(ids, mask)
            max_id = max(max_id, int(ids.max()))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if "train" not in writers:
        raise DataError("no training documents (every document went to the validation split)")
    splits = {name: writer.close() for name, writer in writers.items()}
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name, "byte_order": "little",
        "vocab_size": tokenizer.vocab_size, "max_token_id": max_id,
        "tokenizer": {"hash": tokenizer.hash, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                      "pad_id": tokenizer.pad_id},
        "loss_mask": any(s["mask_file"] for split in splits.values() for s in split["shards"]),
        "splits": splits, **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def prepare(tokenizer: Tokenizer, inputs: Iterable[str | Path], out: str | Path, *, val_fraction: float = 0.0,
            fmt: str = "auto", shard_tokens: int = SHARD_TOKENS, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Tokenize text / JSONL / chat JSONL files into a data folder `out`; returns the manifest.
    Documents go to "val" evenly spaced by `val_fraction` (see assign_splits). The progress bar (on a
    terminal) counts input bytes, with rate and ETA."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise DataError("no input files")
    for path in inputs:  # before any work: a missing or empty file fails at once
        check_input(path)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    with staging_dir(out, overwrite) as tmp, \
            tqdm(total=input_size(inputs), unit="B", unit_scale=True, desc="tokenize",
                 disable=None if progress else True, leave=False) as bar:
        docs = assign_splits(read_documents(inputs, fmt, on_bytes=bar.update), val_fraction)
        sources = [{"path": str(p), "bytes": p.stat().st_size} for p in inputs]
        manifest = write_shards(tokenizer, docs, tmp, shard_tokens=shard_tokens,
                                extra={"sources": sources, "val_fraction": val_fraction})
        if val_fraction and "val" not in manifest["splits"]:
            n = manifest["splits"]["train"]["documents"]
            raise DataError(f"val fraction {val_fraction} of {n} documents selects none: use a larger "
                            f"fraction, more (smaller) documents, or --val-fraction 0")
    return manifest


def staging_dir(out: str | Path, overwrite: bool = False):
    """A fresh temporary folder beside `out` (a context manager); on success it replaces `out` (kept on
    any error). A non-empty `out` is refused unless `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    return staged_dir(out)


# ---- reading -----------------------------------------------------------------------------------
@dataclass
class SplitData:
    """One split of a data folder, memory-mapped. Document d lives in shard doc_shard[d] at
    [doc_start[d], doc_start[d] + doc_len[d]); documents are numbered in storage order."""

    tokens: list[np.ndarray]             # per shard: (n_k,) uint16/uint32 memmap
    masks: list[np.ndarray | None]       # per shard: (n_k,) uint8 memmap, or None (all targets)
    files: list[Path]                    # per shard: its token file, for error messages
    doc_shard: np.ndarray                # (D,) int64
    doc_start: np.ndarray                # (D,) int64
    doc_len: np.ndarray                  # (D,) int64

    @property
    def num_tokens(self) -> int:
        return int(self.doc_len.sum())


def read_manifest(folder: str | Path) -> dict:
    """The manifest of data folder `folder`, checked for format and version."""
    file = Path(folder) / MANIFEST
    if not file.is_file():
        raise DataError(f"no {MANIFEST} in {folder} (create one with `nanoseek data prepare`)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{file}: not a nanoseek data manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{file}: version {manifest.get('version')} is not supported (expected {VERSION})")
    return manifest


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON: identifies a data folder's content in loader states."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def open_split(folder: str | Path, split: str, manifest: dict | None = None) -> SplitData:
    """Memory-map every shard of `split`, checking that each file has the size the manifest says."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if split not in manifest["splits"]:
        have = ", ".join(manifest["splits"])
        hint = " (prepare with --val-fraction)" if split == "val" else ""
        raise DataError(f"{folder / MANIFEST}: no {split!r} split (it has {have}){hint}")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    tokens, masks, files, shard_of, starts, lens = [], [], [], [], [], []
    for k, shard in enumerate(manifest["splits"][split]["shards"]):
        n, d = shard["num_tokens"], shard["num_documents"]
        tokens.append(_map(folder / shard["file"], dtype, n))
        masks.append(_map(folder / shard["mask_file"], MASK_DTYPE, n) if shard["mask_file"] else None)
        files.append(folder / shard["file"])
        start = np.array(_map(folder / shard["docs_file"], DOCS_DTYPE, d), np.int64)
        if d and (start[0] != 0 or np.any(np.diff(start) < 0) or start[-1] > n):
            raise DataError(f"{folder / shard['docs_file']}: document offsets are not increasing within "
                            f"0..{n}")
        shard_of.append(np.full(d, k, np.int64))
        starts.append(start)
        lens.append(np.diff(np.append(start, n)))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return SplitData(tokens, masks, files, cat(shard_of), cat(starts), cat(lens))


def _map(file: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """Read-only memmap of `count` items of `dtype`, or DataError when the file is missing or its size
    is not exactly that (truncated or from another dataset)."""
    if not file.is_file():
        raise DataError(f"{file}: missing (listed in the manifest)")
    expected = count * dtype.itemsize
    if file.stat().st_size != expected:
        raise DataError(f"{file}: {file.stat().st_size} bytes, the manifest says {expected} "
                        f"({count} x {dtype.name})")
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def check_vocab(folder: str | Path, manifest: dict, vocab_size: int) -> None:
    """DataError unless every token id in the data is below the model's `vocab_size`."""
    if manifest["max_token_id"] >= vocab_size:
        raise DataError(f"{Path(folder) / MANIFEST}: token ids go up to {manifest['max_token_id']} "
                        f"(tokenizer vocab {manifest['vocab_size']}) but the model's vocab_size is "
                        f"{vocab_size}")


def check_tokenizer(folder: str | Path, manifest: dict, tokenizer: Tokenizer) -> None:
    """DataError unless the data was tokenized with `tokenizer`."""
    if manifest["tokenizer"]["hash"] != tokenizer.hash:
        raise DataError(f"{Path(folder) / MANIFEST}: the data was tokenized with another tokenizer "
                        f"(hash {manifest['tokenizer']['hash'][:12]}, this one {tokenizer.hash[:12]})")
