"""One request through the engine (`Request`: its prompt, sampling parameters, output so far and decode
state) and what a step reports for it (`RequestOutput`)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..model import LatentCache
from .grammar import Constraint
from .sampling import SamplingParams
from .text import IncrementalDetokenizer, StopStrings

_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model and the `top` most likely (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What one step produced for one request: new token ids and new text (complete characters)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them

    @classmethod
    def of(cls, req: "Request") -> "RequestOutput":
        """The request's state, with no new tokens or text yet."""
        return cls(req.request_id, [], "", req.finished, req.finish_reason, len(req.prompt), len(req.output_ids),
                   req.error, [] if req.pending_logprobs is not None else None)


@dataclass
class Request:
    """One prompt being generated. `output_ids` / `text` accumulate; read them when `finished`."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    drafted: int = 0
    accepted: int = 0
    # decode state (engine-internal)
    generator: torch.Generator | None = None
    limit: int = 0  # max completion tokens (params and context length)
    pos: int = 0  # next rotary position = tokens fed so far
    last: int = -1  # sampled, not yet fed
    draft: int = -1
    draft_q: torch.Tensor | None = None  # draft distribution (sampling only)
    prefilled: int = 0  # chunked prefill progress
    scratch: LatentCache | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None
    constraint: Constraint | None = None  # grammar state (constrained decoding)
    pending_logprobs: list[TokenLogprob] | None = None  # sampled, not yet reported (logprobs asked)
    special: bool = False  # constraint or logprobs: the decoder's slower per-row path

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
