"""Reading input files into documents: plain text, JSONL of {"text"} and chat JSONL of {"messages"}.

A text file is one document, read in chunks of about `CHUNK_BYTES` cut only where the tokenizer's
pre-tokenizer splits anyway (after a newline followed by an ASCII non-space character), so encoding
the chunks one by one gives the ids of the whole file. A JSONL line is one document (its text cut the
same way). Bad input raises DataError naming the file and line (and byte offset for non-UTF-8 bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import DataError
from ..tokenizer import END_THINK, THINK, check_messages

FORMATS = ("auto", "text", "jsonl", "chat")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# ~16 KB: the tokenizers library encodes a batch of such pieces about 3x faster than a batch of whole
# megabyte documents (measured on the Shakespeare corpus, 2 cores).
CHUNK_BYTES = 1 << 14
_SPACE_CODES = frozenset(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")


@dataclass
class Document:
    """One training document: plain text (as `chunks`, an iterator of str) or a chat (`messages`).

    `source` names it in errors and logs (file, or file:line); `split` is "train" or "val"."""

    source: str
    chunks: Iterable[str] | None = None
    messages: list[dict] | None = None
    split: str = "train"


# ---- plain text --------------------------------------------------------------------------------
def check_input(path: Path) -> None:
    """A readable, non-empty regular file, or DataError naming it."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def safe_cut(block: bytes | str) -> int:
    """The largest index i such that block[:i] ends with a newline and block[i] is an ASCII non-space
    character (no pre-token spans such a point), or 0 when there is none."""
    newline = b"\n" if isinstance(block, bytes) else "\n"
    i = len(block) - 1
    while True:
        i = block.rfind(newline, 0, i)
        if i < 0:
            return 0
        nxt = block[i + 1]
        code = nxt if isinstance(nxt, int) else ord(nxt)
        if code < 0x80 and code not in _SPACE_CODES:
            return i + 1


def split_text(text: str, size: int = CHUNK_BYTES) -> Iterator[str]:
    """`text` in pieces of about `size` characters, cut at safe points only (see safe_cut)."""
    start = 0
    while len(text) - start > size:
        window = size
        while not (cut := safe_cut(text[start:start + window])) and start + window < len(text):
            window *= 2  # one long line: look further
        cut = cut or len(text) - start
        yield text[start:start + cut]
        start += cut
    if start < len(text):
        yield text[start:]


def decode_utf8(data: bytes, path: Path, offset: int, line: int) -> str:
    """`data` (which starts at byte `offset`, line `line` of `path`) as str, or DataError naming the
    first invalid byte's offset and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = line + data.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{where}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
                        f"{offset + e.start})") from None


def text_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES,
                on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """The text of `path` in chunks of about `chunk_bytes` (see the module doc); `on_bytes(n)` is told
    how many bytes each chunk held (progress bars)."""
    check_input(path)
    offset, line, pending = 0, 1, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            pending += block
            cut = safe_cut(pending) if block else len(pending)
            if cut:  # else no cut point yet (one long line): read more
                data, pending = pending[:cut], pending[cut:]
                yield decode_utf8(data, path, offset, line)
                offset, line = offset + len(data), line + data.count(b"\n")
                if on_bytes:
                    on_bytes(len(data))
            if not block:
                return


# ---- JSONL -------------------------------------------------------------------------------------
def jsonl_records(path: Path, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path` (a leading byte-order mark dropped);
    DataError at file:line for non-UTF-8 bytes, bad JSON or a line that is not an object."""
    check_input(path)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text = decode_utf8(raw, path, offset, lineno)
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark, as some editors write
            offset += len(raw)
            if on_bytes:
                on_bytes(len(raw))
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def record_document(record: dict, where: str, fmt: str) -> Document | None:
    """The Document of one JSONL record ({"text"} or {"messages"}); None for an empty text."""
    kind = fmt if fmt != "auto" else ("chat" if "messages" in record else "jsonl")
    if kind == "chat":
        if "messages" not in record:
            raise DataError(f"{where}: chat record has no 'messages' key")
        messages = [split_inline_reasoning(m) for m in record["messages"]] \
            if isinstance(record["messages"], list) else record["messages"]
        try:
            check_messages(messages)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        return Document(where, messages=messages)
    text = record.get("text")
    if not isinstance(text, str):
        what = (("no 'text' key" + (" (nor 'messages')" if fmt == "auto" else "")) if "text" not in record
                else f"a non-string 'text' ({type(text).__name__})")
        raise DataError(f"{where}: record has {what}")
    return Document(where, chunks=split_text(text)) if text else None


def split_inline_reasoning(message: dict) -> dict:
    """An assistant message whose content is `<think>R</think>A` (and no reasoning_content) becomes
    {reasoning_content: R, content: A}, both stripped: the template renders the think block itself."""
    if not (isinstance(message, dict) and message.get("role") == "assistant"
            and message.get("reasoning_content") is None and isinstance(message.get("content"), str)):
        return message
    content = message["content"].lstrip()
    if not content.startswith(THINK) or END_THINK not in content:
        return message
    reasoning, answer = content[len(THINK):].split(END_THINK, 1)
    return {**message, "reasoning_content": reasoning.strip(), "content": answer.strip()}


# ---- any input ---------------------------------------------------------------------------------
def file_format(path: Path, fmt: str) -> str:
    """'text' or 'jsonl' reading for `path`: by suffix under --format auto."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if fmt == "auto":
        return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"
    return "text" if fmt == "text" else "jsonl"


def read_documents(paths: Iterable[Path], fmt: str = "auto",
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[Document]:
    """Every document of every input, in order. Text files are one document each; JSONL files one
    per line ({"text"} or, for chat or auto, {"messages"}). Raises DataError when there is none."""
    paths = [Path(p) for p in paths]
    for path in paths:  # fail on a missing or empty file before any work
        check_input(path)
    kinds = [file_format(path, fmt) for path in paths]
    count = 0
    for path, kind in zip(paths, kinds):
        if kind == "text":
            count += 1
            yield Document(str(path), chunks=text_chunks(path, on_bytes=on_bytes))
            continue
        for lineno, record in jsonl_records(path, on_bytes):
            doc = record_document(record, f"{path}:{lineno}", fmt)
            if doc is not None:
                count += 1
                yield doc
    if count == 0:
        raise DataError(f"no documents in {', '.join(map(str, paths))}")


def document_texts(doc: Document) -> Iterator[str]:
    """Plain text of a document for tokenizer training: its chunks, or its messages' contents."""
    if doc.chunks is not None:
        yield from doc.chunks
        return
    for m in doc.messages:
        if m.get("reasoning_content"):
            yield m["reasoning_content"]
        yield m["content"]


def input_size(paths: Iterable[Path]) -> int:
    """Total bytes of the inputs that exist (for a progress bar's total)."""
    return sum(p.stat().st_size for p in map(Path, paths) if p.is_file())


def training_texts(paths: Iterable[Path], fmt: str = "auto",
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Every text of the inputs (chunks, message contents), for training a tokenizer."""
    for doc in read_documents(paths, fmt, on_bytes):
        yield from document_texts(doc)
