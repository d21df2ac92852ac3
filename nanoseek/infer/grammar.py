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
    """A compiled grammar; `constraint()` starts one request's matcher."""

    def __init__(self, tokenizer: GrammarTokenizer, lark: str, start_after: int | None):
        self.tokenizer, self.lark, self.start_after = tokenizer, lark, start_after

        self._free: torch.Tensor | None = None

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
    """One request's grammar state. Free until `start_after` is generated; then `mask()` says which
    tokens may come next and `advance(token)` moves the matcher on."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.active = grammar.start_after is None
        self.matcher = None
        if self.active:
            self._start()

    def _start(self):
        g = self.grammar
        self.matcher = g.tokenizer.llg.LLMatcher(g.tokenizer.tokenizer, g.lark, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_first_line(self.matcher.get_error()))
        self.active = True

    def mask(self, device) -> torch.Tensor:
        """(vocab,) bool, True where a token may come next. Before the start token every token but EOS
        may (the reasoning is free, but must end before the answer the grammar requires)."""
        if not self.active:
            return self.grammar.free_mask(device)
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.grammar.tokenizer.vocab_size].astype(bool)
        if not allowed.any():  # a matcher in an error state: only EOS, so the request ends
            allowed[self.grammar.tokenizer.eos_id] = True
        return torch.from_numpy(allowed).to(device)

    def advance(self, token: int):
        if not self.active:
            if token == self.grammar.start_after:
                self._start()
            return
        self.matcher.consume_token(token)

    @property
    def accepting(self) -> bool:
        return self.active and self.matcher.is_accepting()


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid grammar"
