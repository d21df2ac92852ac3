"""Text side of generation: incremental detokenization, stop strings, the reasoning split, tokenizers.

Every streaming piece here is fed text (or token ids) as it is generated and returns only what is
final: a half-decoded UTF-8 character, the start of a stop string or of `</think>` is held back
until the next tokens say what it is.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Sequence

from ..errors import DataError

REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence
THINK, END_THINK = "<think>", "</think>"


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas without ever emitting half a character.

    Decodes the tokens since the last emitted text, in the context of the tokens before them (some
    tokenizers decode a token differently at the start of a string); a delta is emitted only when the
    decoded text grew and does not end in U+FFFD, i.e. the last bytes form complete characters.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # tokens [prefix, read) are context, already emitted
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        context = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) > len(context) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(context):]
        return ""

    def flush(self) -> str:
        """Whatever is left (a genuinely invalid byte sequence decodes to U+FFFD here)."""
        context = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(context):]


class StopStrings:
    """Cuts a text stream at the first stop string. Holds back the last (longest stop - 1) characters,
    which could be the start of a stop string, until more text arrives."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, stopped). After a stop, the rest of the output is discarded."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class ReasoningSplitter:
    """Splits DeepSeek-R1 output into reasoning (inside `<think>...</think>`) and the answer.

    thinking=True when the prompt already opened the think block (R1's generation prompt ends with
    `<think>\\n`): the output starts as reasoning. Otherwise a `<think>` at the very start opens one.
    Whitespace around `</think>` is dropped (the answer does not start with the template's blank line),
    as DeepSeek's API returns `reasoning_content` and `content`. `push` returns (reasoning, content).
    """

    def __init__(self, thinking: bool = True):
        self.state = "reasoning_start" if thinking else "start"
        self.buffer = ""
        self.reasoning_seen = False

    def push(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning = content = ""
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(THINK):
                    self.buffer, self.state = head[len(THINK):], "reasoning_start"
                    continue
                if THINK.startswith(head):
                    break  # nothing yet, or what could still become <think>
                self.state = "content"
                continue
            if self.state == "reasoning":
                end = self.buffer.find(END_THINK)
                if end >= 0:
                    reasoning += self.buffer[:end].rstrip()
                    self.buffer, self.state = self.buffer[end + len(END_THINK):], "answer_start"
                    continue
                keep = _partial_suffix(self.buffer, END_THINK)
                body = self.buffer[: len(self.buffer) - keep]
                safe = body.rstrip()  # trailing whitespace may precede </think>: hold it
                reasoning += safe
                self.buffer = self.buffer[len(safe):]
                break
            if self.state in ("reasoning_start", "answer_start"):  # drop the template's newlines
                stripped = self.buffer.lstrip()
                if not stripped:
                    self.buffer = ""
                    break
                self.buffer = stripped
                self.state = "reasoning" if self.state == "reasoning_start" else "content"
                continue
            content += self.buffer  # state "content"
            self.buffer = ""
            break
        self.reasoning_seen = self.reasoning_seen or bool(reasoning)
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return rest.rstrip(), ""
        if self.state in ("reasoning_start", "answer_start"):
            return "", ""
        return "", rest if self.state == "content" else rest.lstrip()

    @property
    def in_reasoning(self) -> bool:
        return self.state in ("reasoning_start", "reasoning")


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ---- tokenizers for chat ---------------------------------------------------------------------------
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _byte_level_alphabet()


def _is_byte_level(tokenizer_json: str | None) -> bool:
    """Whether a tokenizer.json decodes byte-level BPE pieces (its token strings then map to bytes);
    other tokenizers' token bytes come from decoding the token alone."""
    if tokenizer_json is None:
        return False
    decoder = json.loads(tokenizer_json).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


class ChatTokenizer:
    """What generation needs from a tokenizer: ids <-> text, the chat prompt, stop tokens.

    Built from nanoseek's tokenizer (R1 special tokens and template) when the folder has one, else from
    transformers' AutoTokenizer and the folder's own chat template (any HF model folder).
    """

    def __init__(self, encode, decode, render, eos_ids: Sequence[int], vocab_size: int,
                 end_think_id: int | None, name: str, *, id_to_token=None, special_ids: Sequence[int] = (),
                 backend_json: Callable[[], str] | None = None):
        self._encode, self._decode, self._render = encode, decode, render
        self.eos_ids = tuple(i for i in eos_ids if i is not None)
        self.vocab_size = vocab_size
        self.end_think_id = end_think_id
        self.name = name
        self._id_to_token = id_to_token
        self._special_ids = frozenset(special_ids)
        self._backend_json = backend_json
        self._byte_cache: dict[int, bytes] = {}

    def token_bytes(self, token: int) -> bytes:
        """The bytes token id `token` stands for (part of a UTF-8 character, possibly): a byte-level
        BPE token's pieces mapped back to bytes; a special token's text."""
        cached = self._byte_cache.get(token)
        if cached is None:
            piece = self._id_to_token(token) if self._id_to_token is not None and self.byte_level else None
            if piece is None or token in self._special_ids or any(ch not in _UNICODE_TO_BYTE for ch in piece):
                cached = self.decode([token]).encode("utf-8")
            else:
                cached = bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
            self._byte_cache[token] = cached
        return cached

    @functools.cached_property
    def byte_level(self) -> bool:
        """Whether token strings are byte-level BPE pieces (read from tokenizer.json on first use)."""
        return _is_byte_level(self.tokenizer_json())

    def tokenizer_json(self) -> str | None:
        """tokenizer.json's text (what a grammar library reads), or None when there is none."""
        return self._backend_json() if self._backend_json is not None else None

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(list(ids))

    def chat_prompt(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> tuple[list[int], bool]:
        """Token ids of the conversation followed by the generation prompt, and whether that prompt
        opened a think block (the output then starts as reasoning). `tools` (a list, possibly empty):
        the conversation may use tools (DeepSeek-V3's format), the listed ones are offered."""
        ids, text = self._render(messages, tools)
        return ids, text.rstrip().endswith(THINK)


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """The tokenizer of a model folder (tokenizer.json, and tokenizer_config.json's chat template)."""
    from ..tokenizer import Tokenizer
    path = Path(path)
    if not path.exists():
        raise DataError(f"model folder not found: {path}")
    try:
        tok = Tokenizer.load(path)
    except DataError as e:
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise DataError(f"{path}: no tokenizer files (tokenizer.json); a model folder needs one to chat "
                            "(train one with `nanoseek tokenizer train`)") from None
        if "special tokens" not in str(e):
            raise
        return _hf_tokenizer(path)

    def render(messages, tools=None):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools), \
            tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, tools=tools)

    return ChatTokenizer(tok.encode, tok.decode, render, (tok.eos_id,), tok.vocab_size, tok.end_think_id,
                         "nanoseek", id_to_token=tok.id_to_token, special_ids=tok.special_ids,
                         backend_json=tok.backend.to_str)


def _hf_tokenizer(path: Path) -> ChatTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"{path}: the tokenizer lacks DeepSeek-R1's special tokens and transformers is not "
                        "installed to read it otherwise") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds on unreadable folders
        raise DataError(f"{path}: cannot read the tokenizer ({e})") from None
    if not getattr(hf, "chat_template", None):
        raise DataError(f"{path}: the tokenizer has no chat template (tokenizer_config.json 'chat_template')")

    def render(messages, tools=None):
        text = hf.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False,
                                      tools=list(tools) if tools else None)
        return hf.encode(text, add_special_tokens=False), text

    end_think = hf.convert_tokens_to_ids(END_THINK) if END_THINK in hf.get_vocab() else None
    backend = getattr(hf, "backend_tokenizer", None)
    return ChatTokenizer(lambda t: hf.encode(t, add_special_tokens=False),
                         lambda ids: hf.decode(ids, skip_special_tokens=False), render,
                         (hf.eos_token_id,), len(hf), end_think, "transformers",
                         id_to_token=hf.convert_ids_to_tokens, special_ids=hf.all_special_ids,
                         backend_json=backend.to_str if backend is not None else None)
