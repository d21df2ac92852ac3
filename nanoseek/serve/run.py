"""One API request in flight: its choices' engine requests on the Scheduler, their outputs carried from
the engine thread to the event loop, and the answer collected (JSON) or streamed (SSE); or, for a
refused input, the refusal without running the model."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..infer.sampling import SamplingParams
from ..infer.scheduler import QueueFull, Scheduler, SchedulerClosed
from .answer import Answer
from .metrics import Metrics
from .policy import Decision, Policy
from .protocol import ChoiceStream, Delta
from .wire import SSE_KEEPALIVE, APIError, sse_event, sse_response


class Run:
    """The engine requests of one answer's choices; start() answers with JSON or an SSE stream."""

    def __init__(self, scheduler: Scheduler, policy: Policy | None, end_think_id: int | None, keepalive_s: float,
                 answer: Answer, metrics: Metrics | None = None, started: float | None = None,
                 endpoint: str = "", audit: dict | None = None):
        self.scheduler, self.policy, self.end_think_id, self.keepalive_s = scheduler, policy, end_think_id, keepalive_s
        self.answer = answer
        self.choices = answer.choices
        self.metrics, self.endpoint = metrics, endpoint
        self.started = time.monotonic() if started is None else started  # for the time to first token
        self.first_token_seen = False
        self.audit = audit or {"source": "serve", "request_id": answer.rid}  # context of audit records

    # ---- starting -------------------------------------------------------------------------------
    async def start(self, prompts: list[list[int]], params: list[SamplingParams], request: Request, stream: bool):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        for _ in prompts:
            monitor = self.policy.output_monitor() if self.policy is not None else None
            self.choices.append(self.answer.new_choice(monitor, self.end_think_id))
        sinks = [self._sink(loop, i) for i in range(len(prompts))]
        try:
            self.ids = self.scheduler.submit_many(prompts, params, sinks)
        except QueueFull:
            raise APIError(503, "The server is overloaded (request queue full). Retry shortly.",
                           type="server_error", code="overloaded", headers={"Retry-After": "1"}) from None
        except SchedulerClosed:
            raise APIError(503, "The generation engine is not running.", type="server_error",
                           code="unavailable") from None
        self.open = set(range(len(prompts)))
        if stream:
            return sse_response(self._sse())
        return await self._collect(request)

    def _sink(self, loop, index: int):
        def put(out):
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
        return put

    def _cancel_open(self):
        for i in self.open:
            self.scheduler.cancel(self.ids[i])

    async def _next(self) -> list[tuple[int, Delta]]:
        """Wait for engine outputs; -> (choice, delta) pairs. Choices a policy stopped are cancelled."""
        index, out = await self.queue.get()
        batch = [(index, out)]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        deltas = []
        for index, out in batch:
            if index not in self.open:
                continue
            if out.finish_reason == "error":
                self.open.discard(index)
                self._cancel_open()
                self.open.clear()
                raise APIError(500, out.error or "generation failed", type="server_error")
            if out.token_ids and not self.first_token_seen and self.metrics is not None:
                self.first_token_seen = True
                self.metrics.first_token(self.endpoint, time.monotonic() - self.started)
            delta = self.choices[index].feed(out)
            delta.audit(self.policy, **self.audit)
            if self.metrics is not None:
                for decision in delta.flags + ([delta.refusal] if delta.refusal is not None else []):
                    self.metrics.policy(decision)
            if delta.refusal is not None and not out.finished:
                self.scheduler.cancel(self.ids[index])
            if delta.finished:
                self.open.discard(index)
            deltas.append((index, delta))
        return deltas

    # ---- non-streaming --------------------------------------------------------------------------
    async def _collect(self, request: Request):
        async def collect():
            while self.open:
                await self._next()

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                self._cancel_open()
            watch.cancel()
        if not work.done() or work.cancelled():
            return Response(status_code=499)  # the client is gone
        work.result()  # re-raise an engine error
        return JSONResponse(self.answer.final_body())

    # ---- streaming ------------------------------------------------------------------------------
    async def _sse(self):
        pending = None
        try:
            for i in range(len(self.choices)):
                for chunk in self.answer.opening(i):
                    yield chunk
            while self.open:
                pending = pending or asyncio.ensure_future(self._next())
                done, _ = await asyncio.wait({pending}, timeout=self.keepalive_s)
                if not done:
                    yield SSE_KEEPALIVE
                    continue
                task, pending = pending, None
                try:
                    deltas = task.result()
                except APIError as e:
                    yield sse_event(e.body(), ascii_only=True)
                    break
                for index, d in deltas:
                    for chunk in self.answer.delta_chunks(index, d):
                        yield chunk
            for chunk in self.answer.closing():
                yield chunk
        finally:  # the client disconnected (the response task is cancelled) or we are done
            if pending is not None:
                pending.cancel()
            self._cancel_open()


def refused(answer: Answer, decision: Decision, n: int, stream: bool):
    """Answer n choices with the rule's message (finish_reason content_filter), without running the model."""
    for _ in range(n):
        c = ChoiceStream(False, split=False)
        c.refusal, c.finish_reason = decision, "content_filter"
        answer.choices.append(c)
    if not stream:
        return JSONResponse(answer.final_body())

    async def events():
        for i in range(n):
            for chunk in answer.opening(i) + answer.delta_chunks(i, Delta(refusal=decision, finished=True,
                                                                         finish_reason="content_filter")):
                yield chunk
        for chunk in answer.closing():
            yield chunk
    return sse_response(events(), headers=None)  # (this answer never asked proxies not to buffer)
