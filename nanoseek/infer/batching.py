"""The engine's queues before decoding and what one step may prefill.

A request waits (arrival order) until a step admits it. Each step has a budget of `prefill_chunk`
prompt tokens and `max_batch` rows: it first continues the long prompts being prefilled in chunks, then
admits waiting requests in order, whole prompts together as one batch, or a prompt longer than what is
left of the budget in chunks (only as the first of the step's newcomers). Running the prefills is the
engine's part (callbacks), so this module holds no tensors.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Callable, Iterator

from .request import Request


class Admission:
    """Requests not yet decoding: `waiting`, `prefilling` (a long prompt, chunk by chunk) and
    `admitting` (the batch whose prefill runs inside the current step)."""

    def __init__(self, max_batch: int, prefill_chunk: int):
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.admitting: list[Request] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling)

    def queued(self) -> Iterator[Request]:
        """Waiting, then prefilling requests (those a cancel can reach)."""
        return itertools.chain(self.waiting, self.prefilling)

    def pending(self) -> Iterator[Request]:
        """Every request not yet running, the batch being admitted included."""
        return itertools.chain(self.waiting, self.prefilling, self.admitting)

    def drop_cancelled(self) -> list[Request]:
        """Remove cancelled requests (waiting ones first, then prefilling ones, whose partial cache goes)."""
        gone = [r for r in self.waiting if r.cancelled]
        for req in gone:
            self.waiting.remove(req)
        for req in [r for r in self.prefilling if r.cancelled]:
            self.prefilling.remove(req)
            req.scratch = None
            gone.append(req)
        return gone

    def clear(self):
        self.waiting.clear()
        self.prefilling.clear()
        self.admitting = []

    def admit(self, running: Callable[[], int], prefill_chunk: Callable[[Request, int], int],
              prefill_batch: Callable[[list[Request]], None]):
        """Spend one step's budget: prefill_chunk(req, budget) runs the next chunk of a long prompt and
        returns the tokens it used (the request leaves `prefilling` through `prefilled` when its last
        chunk is done); prefill_batch(reqs) runs whole prompts together. `running()`: rows decoding now."""
        budget = self.prefill_chunk
        for req in list(self.prefilling):
            if budget <= 0:
                return
            budget -= prefill_chunk(req, budget)
        batch: list[Request] = []
        while self.waiting and budget > 0 and running() + len(self.prefilling) + len(batch) < self.max_batch:
            req = self.waiting[0]
            if len(req.prompt) <= budget:
                batch.append(self.waiting.popleft())
                budget -= len(req.prompt)
            elif not batch:
                self.prefilling.append(self.waiting.popleft())
                budget -= prefill_chunk(req, budget)
            else:
                break
        if batch:
            self.admitting = batch  # neither waiting nor running: abort_all must still find them
            prefill_batch(batch)
            self.admitting = []

    def prefilled(self, req: Request):
        """A chunked prefill is complete: the request leaves the queue (to run, or finished)."""
        self.prefilling.remove(req)
