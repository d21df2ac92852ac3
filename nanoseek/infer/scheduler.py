"""Runs an Engine on a background thread so many callers can share one running batch.

Callers (server handlers on an asyncio loop, the chat CLI on the main thread) submit requests and
cancel them at any time; the engine thread applies both between two steps, so requests join and leave
the running batch without stopping it, and a slow reader never slows the batch down (outputs go into
each caller's queue). Admission control: at most max_batch running plus max_waiting queued requests;
beyond that `submit` raises QueueFull (the server answers 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable, Iterator

from .engine import Engine, RequestOutput
from .sampling import SamplingParams

log = logging.getLogger("nanoseek.infer")
_ids = itertools.count()


class QueueFull(Exception):
    """Too many requests in flight; retry later."""


class SchedulerClosed(Exception):
    """The engine thread is stopped (shutdown, or a fatal error)."""


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int = 64, report_every: float = 10.0):
        self.engine = engine
        self.max_waiting = max_waiting
        self.report_every = report_every  # seconds between progress lines (log level INFO) while busy
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        self._sinks: dict[str, Callable[[RequestOutput], None]] = {}
        self._in_flight = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()

    # ---- thread-safe API ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.engine.max_batch + self.max_waiting

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[RequestOutput], None],
               request_id: str | None = None) -> str:
        """Queue a request; `sink` receives its RequestOutputs on the engine thread (keep it quick)."""
        rid = request_id or f"req-{next(_ids)}"
        with self._cond:
            if not self.alive:
                raise SchedulerClosed("the generation engine is not running")
            if self._in_flight >= self.capacity:
                raise QueueFull(f"{self._in_flight} requests in flight (capacity {self.capacity})")
            self._in_flight += 1
            self._sinks[rid] = sink
            self._inbox.append(("add", rid, prompt, params))
            self._cond.notify()
        return rid

    def submit_many(self, prompts: list[list[int]], params: list[SamplingParams],
                    sinks: list[Callable[[RequestOutput], None]]) -> list[str]:
        """All or nothing: either every request is queued or QueueFull is raised."""
        with self._cond:
            if self._in_flight + len(prompts) > self.capacity:
                raise QueueFull(f"{self._in_flight} requests in flight (capacity {self.capacity})")
            return [self.submit(p, sp, s) for p, sp, s in zip(prompts, params, sinks)]

    def cancel(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._sinks:
                self._inbox.append(("cancel", request_id))
                self._cond.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- consumers ------------------------------------------------------------------------------
    async def stream(self, prompt: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Async iterator of RequestOutputs; leaving it early (or being cancelled) cancels the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = self.submit(prompt, params, _threadsafe_put(loop, outputs), request_id)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.cancel(rid)

    def stream_sync(self, prompt: list[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Blocking iterator of RequestOutputs (for a terminal); closing it cancels the request."""
        outputs: queue.Queue[RequestOutput] = queue.Queue()
        rid = self.submit(prompt, params, outputs.put)
        finished = False
        try:
            while not finished:
                out = outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.cancel(rid)

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self):
        engine = self.engine
        last_report, last_tokens = time.monotonic(), 0
        while True:
            with self._cond:
                while not self._inbox and not engine.has_work and not self._closed:
                    self._cond.wait()
                if self._closed:
                    break
                inbox, self._inbox = self._inbox, []
            if not engine.has_work:  # waking up: idle time is not part of a rate
                last_report, last_tokens = time.monotonic(), engine.stats["generated_tokens"]
            for item in inbox:
                if item[0] == "add":
                    _, rid, prompt, params = item
                    try:
                        engine.add(prompt, params, request_id=rid)
                    except ValueError as e:
                        self._deliver(RequestOutput(rid, [], "", True, "error", len(prompt), 0, str(e)))
                    except Exception as e:  # never let one request stop the engine thread
                        log.exception("could not queue request %s", rid)
                        self._deliver(RequestOutput(rid, [], "", True, "error", len(prompt), 0,
                                                    f"could not queue the request: {type(e).__name__}"))
                else:
                    engine.cancel(item[1])
            if not engine.has_work:
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a failed step poisons the cache: end every request, keep serving
                log.exception("generation step failed")
                outputs = engine.abort_all("error", f"generation failed: {type(e).__name__}")
            for out in outputs:
                self._deliver(out)
            now = time.monotonic()
            if now - last_report >= self.report_every:
                tokens = engine.stats["generated_tokens"]
                rate = (tokens - last_tokens) / (now - last_report)
                spec = f", MTP acceptance {engine.acceptance_rate():.0%}" if engine.speculative else ""
                log.info("engine: %d running, %d waiting, %.1f tokens/s%s", engine.num_running,
                         self._in_flight - engine.num_running, rate, spec)
                last_report, last_tokens = now, tokens
        for out in engine.abort_all("cancelled"):
            self._deliver(out)

    def _deliver(self, out: RequestOutput):
        with self._cond:
            sink = self._sinks.get(out.request_id)
            if out.finished and sink is not None:
                del self._sinks[out.request_id]
                self._in_flight -= 1
        if sink is not None:
            try:
                sink(out)
            except Exception:  # a consumer that went away (closed event loop) must not stop the engine
                log.debug("dropped output for %s", out.request_id, exc_info=True)


def _threadsafe_put(loop: asyncio.AbstractEventLoop, q: asyncio.Queue):
    def put(out: RequestOutput):
        loop.call_soon_threadsafe(q.put_nowait, out)
    return put
