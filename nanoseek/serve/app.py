"""The HTTP API: OpenAI- and DeepSeek-compatible chat and text completions over one Scheduler.

GET  /health                 liveness and load (no key needed)
GET  /metrics                Prometheus metrics (no key needed)
GET  /v1/models              the served model
POST /v1/chat/completions    chat (stream or not); reasoning in `reasoning_content` and `reasoning`
POST /v1/completions         raw text completion
GET  /                       the web chat page

Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body, a
field the server does not honour, invalid Unicode, a prompt that does not fit or a request larger than
the server can ever run, 401 for a missing or wrong key, 404 unknown model or path, 413 a body over
the size limit, 422 a parameter out of range or unsupported, 429 a client over its rate limit, 503
when the queue is full or the engine is down. Messages never echo the request.

This module holds the routes and the handlers; wire.py the error mapping and SSE framing, access.py
the key, rate limit and body limit, prepare.py the request -> prompt mapping, run.py and answer.py the
generation and its answer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..infer.scheduler import Scheduler
from ..infer.text import ChatTokenizer
from .access import BodyLimit, RateLimiter, authorize
from .answer import Answer
from .config import ServerConfig
from .metrics import ARRIVAL, Metrics, MetricsMiddleware
from .policy import Decision, Policy
from .prepare import Prepared, Preparer, sampling
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from .run import Run, refused
from .wire import ERROR_RESPONSES, APIError, add_error_handlers

__all__ = ["APIError", "ServerConfig", "create_app"]


def create_app(scheduler: Scheduler, tokenizer: ChatTokenizer, config: ServerConfig,
               policy: Policy | None = None) -> FastAPI:
    """The FastAPI app serving `scheduler`'s engine with `tokenizer`'s chat template."""
    app = FastAPI(title="nanoseek", version="1", description="OpenAI/DeepSeek-compatible API of a nanoseek model",
                  responses=ERROR_RESPONSES)
    api = _Api(scheduler, tokenizer, config, policy)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=api.metrics)  # outside BodyLimit: its 413s count too
    app.state.api = api
    page = resources.files("nanoseek.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    add_error_handlers(app)

    async def authorized(request: Request):
        api.limiter.check(request)  # first: a client over its budget (or guessing keys) gets 429
        authorize(config, request, api.limiter)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        ok = scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": config.model_name,
                "running": scheduler.engine.num_running, "in_flight": scheduler.in_flight,
                "capacity": scheduler.capacity, "precision": scheduler.engine.precision_plan.name}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(api.metrics.render(), media_type=api.metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str):
        api.check_model(model_id)
        return api.model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await api.answer("chat", body, request)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        return await api.answer("completion", body, request)

    return app


class _Api:
    """The endpoints' logic (kept out of the route functions so they stay one line each)."""

    def __init__(self, scheduler: Scheduler, tokenizer: ChatTokenizer, config: ServerConfig, policy: Policy | None):
        self.scheduler, self.tokenizer, self.config, self.policy = scheduler, tokenizer, config, policy
        self.context = scheduler.engine.max_model_len
        self.prepare = Preparer(tokenizer, config, self.context, scheduler.engine.config.vocab_size,
                                scheduler.capacity)
        self.limiter = RateLimiter(config)
        self.metrics = Metrics(scheduler)
        self.created = int(time.time())
        self._workers: asyncio.Semaphore | None = None  # made on the serving loop, on first use

    def check_model(self, name: str | None):
        """404 for another model's name (not echoed: it is the client's text, of any length and content)."""
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The requested model does not exist; this server serves "
                           f"'{self.config.model_name}'.", param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "max_model_len": self.context}

    async def answer(self, kind: str, body: SamplingFields, request: Request):
        """Screen the body on the loop, tokenize it and check the input rules in a worker thread (at most
        config.tokenizer_threads at once, so long prompts neither stall the loop nor pile up in memory),
        then refuse it under the policy or run the choices."""
        started = request.scope.get(ARRIVAL, time.monotonic())
        self.check_model(body.model)
        self.prepare.screen(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}" if kind == "chat" else f"cmpl-{uuid.uuid4().hex}"
        if self._workers is None:
            self._workers = asyncio.Semaphore(max(1, self.config.tokenizer_threads))
        async with self._workers:
            prepared, refusal = await asyncio.to_thread(self._prepare, kind, body, rid)
        answer = Answer(rid, kind, self.config.model_name, prepared.prompt_tokens, body.include_usage,
                        prepared.thinking)
        if refusal is not None:
            return refused(answer, refusal, len(prepared.prompts), body.stream)
        answer.take(prepared, self.tokenizer)
        endpoint = request.scope.get("route").path if request.scope.get("route") else kind
        run = Run(self.scheduler, self.policy, self.tokenizer.end_think_id, self.config.keepalive_s, answer,
                  metrics=self.metrics, started=started, endpoint=endpoint, audit=audit_context(rid, body))
        return await run.start(prepared.prompts, sampling(body, prepared), request, body.stream)

    def _prepare(self, kind: str, body: SamplingFields, rid: str) -> tuple[Prepared, Decision | None]:
        """(the request's prompts, the input rule refusing it or None); in a worker thread."""
        prepared = self.prepare.chat(body) if kind == "chat" else self.prepare.completion(body)
        if self.policy is None:
            return prepared, None
        decisions = self.policy.check_input_all(self.policy.input_text(prepared.texts), **audit_context(rid, body))
        for d in decisions:
            self.metrics.policy(d)
        return prepared, next((d for d in decisions if d.refuses), None)


def audit_context(rid: str, body: SamplingFields) -> dict:
    """What the policy's audit records say about a request: its id and the client's `user` id, if any."""
    context = {"source": "serve", "request_id": rid}
    if body.user:
        context["user"] = body.user[:256]
    return context
