"""Constrained decoding: a grammar (a JSON schema) that the answer must follow, enforced token by token
with llguidance's token bitmask.

The grammar applies to the answer only: with a reasoning model the tokens up to and including
`</think>` (the tokenizer's END_THINK id) are free but for EOS (an output may not end before the answer
the grammar requires), and the mask applies from the next token on. The
answer may start with up to 4 whitespace characters (the chat template puts a blank line after
`</think>`; the reasoning split drops it), then one JSON value the schema accepts, then end-of-sentence:
llguidance allows the EOS id only where the grammar accepts, and only EOS once the value is complete.
JSON is generated without whitespace between its tokens (a random or weak model would otherwise
spend its budget on it).

The llguidance tokenizer is built once per tokenizer (from its tokenizer.json: byte-level BPE) and a
grammar compiled once per request body; each engine request gets its own matcher (`Constraint`).
"""

from __future__ import annotations

import json

import numpy as np
import torch

LEADING_SPACE = r"/[ \t\r\n]{0,4}/"


class GrammarError(ValueError):
    """The schema cannot be compiled into a grammar (the message says why)."""


class GrammarTokenizer:
    """llguidance's view of a byte-level BPE tokenizer: `tokenizer_json` is tokenizer.json's text,
    `vocab_size` the model's (ids past the tokenizer's are never allowed), `eos_id` the end id."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_id: int):
        import llguidance
        self.llg = llguidance
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)

    def json_grammar(self, schema: dict | None, start_after: int | None = None) -> "Grammar":
        """A grammar for one JSON value that `schema` accepts (None: any JSON object), applied after
        the token `start_after` (None: from the first generated token). Raises GrammarError."""
        schema = {"type": "object"} if schema is None else dict(schema)
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        return self.lark_grammar(f"start: {LEADING_SPACE} answer\nanswer: {json_rule(schema)}", start_after)

    def lark_grammar(self, lark: str, start_after: int | None = None) -> "Grammar":
        """A grammar in llguidance's Lark dialect (rule `start`); raises GrammarError when it does not
        compile."""
        error = self.llg.LLMatcher.validate_grammar(lark, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(_first_line(error))
        return Grammar(self, lark, start_after)


def json_rule(schema: dict) -> str:
    """The Lark expression for one JSON value that `schema` accepts, without whitespace between tokens."""
    schema = dict(schema)
    schema["x-guidance"] = dict(schema.get("x-guidance") or {}, whitespace_flexible=False)
    return f"%json {json.dumps(schema, ensure_ascii=False)}"


class Grammar:
    """A compiled grammar; `constraint()` starts one request's matcher.

    start_after: the token id after which the grammar applies (None: from the first token); until then
    every token but EOS may come. trigger (a lazy grammar, for text that may or may not contain a
    structured part): after `start_after`, the output is free (EOS included) until its bytes contain
    `trigger`; the grammar, which must itself start with the trigger's text, then applies from the
    trigger on."""

    def __init__(self, tokenizer: GrammarTokenizer, lark: str, start_after: int | None, trigger: str | None = None):
        self.tokenizer, self.lark, self.start_after = tokenizer, lark, start_after
        self.trigger = trigger.encode("utf-8") if trigger else None
        self._free: torch.Tensor | None = None

    def lazy(self, trigger: str) -> "Grammar":
        """This grammar, applied only from the first occurrence of `trigger` in the output on."""
        return Grammar(self.tokenizer, self.lark, self.start_after, trigger)

    def constraint(self) -> "Constraint":
        return Constraint(self)

    def free_mask(self, device) -> torch.Tensor:
        """Every token but EOS (shared by the requests of this grammar; never written to)."""
        if self._free is None or self._free.device != torch.device(device):
            free = torch.ones(self.tokenizer.vocab_size, dtype=torch.bool, device=device)
            free[self.tokenizer.eos_id] = False
            self._free = free
        return self._free


class Constraint:
    """One request's grammar state: "before" (until `start_after`), "watching" (a lazy grammar before
    its trigger), "active". `mask()` says which tokens may come next (None: any), `advance(token)`
    moves the state on."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.matcher = None
        self.state = "before"
        self.seen = b""  # watching: the output's last bytes (a trigger may span tokens)
        if grammar.start_after is None:
            self._started()

    @property
    def active(self) -> bool:
        return self.state == "active"

    def _started(self):
        """`start_after` came: the grammar applies now, or once its trigger shows."""
        if self.grammar.trigger is None:
            self._start()
        else:
            self.state = "watching"

    def _start(self, prefix: bytes = b""):
        """Start the matcher; `prefix`: output bytes it must consume first (the trigger and what
        followed it in the token that completed it)."""
        g = self.grammar
        self.matcher = g.tokenizer.llg.LLMatcher(g.tokenizer.tokenizer, g.lark, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_first_line(self.matcher.get_error()))
        self.state = "active"
        if prefix:  # any tokenization of these bytes will do: the matcher checks bytes against the grammar
            self.matcher.consume_tokens(g.tokenizer.tokenizer.tokenize_bytes(prefix))

    def mask(self, device) -> torch.Tensor | None:
        """(vocab,) bool, True where a token may come next; None when any token may. Before the start
        token every token but EOS may (the reasoning is free, but must end before the answer the grammar
        requires); a lazy grammar watching for its trigger allows everything."""
        if self.state == "watching":
            return None
        if self.state == "before":
            return self.grammar.free_mask(device) if self.grammar.trigger is None else None
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.grammar.tokenizer.vocab_size].astype(bool)
        if not allowed.any():  # a matcher in an error state: only EOS, so the request ends
            allowed[self.grammar.tokenizer.eos_id] = True
        return torch.from_numpy(allowed).to(device)

    def advance(self, token: int):
        if self.state == "before":
            if token == self.grammar.start_after:
                self._started()
        elif self.state == "watching":
            trigger = self.grammar.trigger
            self.seen += self.grammar.tokenizer.tokenizer.decode_bytes([token])
            at = self.seen.find(trigger)
            if at >= 0:
                self._start(self.seen[at:])
            else:
                self.seen = self.seen[-(len(trigger) - 1):]
        else:
            self.matcher.consume_token(token)

    @property
    def accepting(self) -> bool:
        return self.active and self.matcher.is_accepting()


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid grammar"
