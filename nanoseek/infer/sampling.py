"""Sampling parameters of one request and the token distributions they define.

A request samples from softmax(logits / temperature) restricted to its top_k tokens and then to the
smallest set reaching top_p probability; temperature 0 is greedy (argmax). Speculative decoding needs
the distribution itself (not only a sample) to accept or reject a draft, so `probabilities` returns it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


GREEDY_BELOW = 1e-5  # a temperature this small is argmax (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's top_logprobs limit)


@dataclass
class SamplingParams:
    """How one request is decoded. Raises ValueError (naming the field) on invalid values.

    max_tokens: generated tokens at most (None: up to the engine's context length).
    stop: strings that end the output (not included in the text); stop_token_ids: tokens that end it
    (included in the ids, not in the text). The tokenizer's end-of-sentence token stops too unless
    ignore_eos. seed: a per-request generator, so a seeded request samples the same tokens whatever
    else shares its batch.
    """

    max_tokens: int | None = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    grammar: Any = None  # a nanoseek.infer.grammar.Grammar the output must follow (constrained decoding)
    extra: dict = field(default_factory=dict)  # free-form tags a caller wants back (never read here)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.stop_token_ids = tuple(self.stop_token_ids or ())
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0: off), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW decode greedily (as vLLM does): logits / 1e-300 overflow."""
        return self.temperature < GREEDY_BELOW

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed & 0x7FFF_FFFF_FFFF_FFFF)


def probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """logits (..., vocab) -> fp32 probabilities after temperature, top_k and top_p (temperature > 0).
    top_p keeps the smallest set of tokens whose probability reaches it."""
    logits = logits.float()
    if temperature != 1.0:  # x / 1.0 is x: GRPO's temperature skips a pass over (rows, vocab)
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[..., 0] = False  # the most likely token always stays (a top_p that rounds to 0 in fp32)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id from probs (vocab,)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def uniform(generator: torch.Generator | None, device) -> float:
    return float(torch.rand((), generator=generator, device=device))
