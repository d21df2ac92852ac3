"""The HTTP API: OpenAI- and DeepSeek-compatible chat and text completions over one Scheduler.

GET  /health                 liveness and load (no key needed)
GET  /v1/models              the served model
POST /v1/chat/completions    chat (stream or not); reasoning in `reasoning_content` and `reasoning`
POST /v1/completions         raw text completion
GET  /                       the web chat page

Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body or
a prompt that does not fit, 401 for a missing or wrong key, 404 unknown model or path, 413 a body over
the size limit, 422 a parameter out of range or unsupported, 429 a client over its rate limit, 503
when the queue is full or the engine is down. Messages never echo the request.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DataError
from ..infer.sampling import SamplingParams
from ..infer.scheduler import QueueFull, Scheduler, SchedulerClosed
from ..infer.text import ChatTokenizer
from .policy import Decision, Policy
from .protocol import ChatCompletionRequest, ChoiceStream, CompletionRequest, Delta

log = logging.getLogger("nanoseek.serve")
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                "multiple_of"}


@dataclass
class ServerConfig:
    """Limits and identity of one server. None limits derive from the engine's context length."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_prompt_tokens: int | None = None  # default: context length - 1
    max_tokens_limit: int | None = None  # default: context length
    default_max_tokens: int = 512
    max_n: int = 8
    rate_limit: int = 0  # requests per minute per client (API key or address); 0: off
    keepalive_s: float = 15.0


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


ERROR_SCHEMA = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "integer", "null"]}}}}}}}}
ERROR_RESPONSES = {code: {"description": text, **ERROR_SCHEMA} for code, text in (
    (400, "malformed body or prompt too long"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "body too large"), (422, "parameter out of range or unsupported"), (429, "rate limited"),
    (503, "queue full or engine down"))}


def create_app(scheduler: Scheduler, tokenizer: ChatTokenizer, config: ServerConfig,
               policy: Policy | None = None) -> FastAPI:
    """The FastAPI app serving `scheduler`'s engine with `tokenizer`'s chat template."""
    app = FastAPI(title="nanoseek", version="1", description="OpenAI/DeepSeek-compatible API of a nanoseek model",
                  responses=ERROR_RESPONSES)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    api = _Api(scheduler, tokenizer, config, policy)
    app.state.api = api
    page = resources.files("nanoseek.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = {404: "Not found", 405: "Method not allowed"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(message, "invalid_request_error", None, e.status_code),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    async def authorize(request: Request):
        api.authorize(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        ok = scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": config.model_name,
                "running": scheduler.engine.num_running, "in_flight": scheduler.in_flight,
                "capacity": scheduler.capacity}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        api.check_model(model_id)
        return api.model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await api.chat(body, request)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        return await api.complete(body, request)

    return app


def validation_error(errors: list[dict]) -> APIError:
    """pydantic errors -> one APIError: 422 for a value out of range, 400 for anything malformed."""
    first = errors[0] if errors else {"type": "missing", "loc": ("body",), "msg": "invalid body"}
    loc = [str(x) for x in first.get("loc", ())][1:]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON ({detail})." if detail else
                        "The request body is not valid JSON.", code="invalid_json")
    if not loc:
        if kind == "missing":
            return APIError(400, "The request body is missing; send a JSON object.", code="invalid_body")
        return APIError(400, "The request body must be a JSON object.", code="invalid_body")
    param = ".".join(loc)
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    status = 422 if kind in RANGE_ERRORS else 400
    return APIError(status, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param,
                    code="invalid_value" if status == 422 else "invalid_type")


class _Api:
    """The endpoints' logic (kept out of the route functions so they stay one line each)."""

    def __init__(self, scheduler: Scheduler, tokenizer: ChatTokenizer, config: ServerConfig, policy: Policy | None):
        self.scheduler, self.tokenizer, self.config, self.policy = scheduler, tokenizer, config, policy
        self.context = scheduler.engine.max_model_len
        self.max_prompt = min(config.max_prompt_tokens or self.context - 1, self.context - 1)
        self.max_tokens = min(config.max_tokens_limit or self.context, self.context)
        self.created = int(time.time())
        self._hits: dict[str, collections.deque] = {}

    # ---- checks ---------------------------------------------------------------------------------
    def authorize(self, request: Request):
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("api-key", "")
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def rate_limit(self, request: Request):
        limit = self.config.rate_limit
        if limit <= 0:
            return
        client = request.headers.get("authorization") or (request.client.host if request.client else "?")
        now = time.monotonic()
        hits = self._hits.setdefault(client, collections.deque())
        while hits and now - hits[0] > 60:
            hits.popleft()
        if len(hits) >= limit:
            raise APIError(429, f"Rate limit reached: {limit} requests per minute. Retry later.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(60 - (now - hits[0])) + 1))})
        hits.append(now)

    def check_model(self, name: str | None):
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"The model '{name[:100]}' does not exist; this server serves "
                           f"'{self.config.model_name}'.", param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "nanoseek",
                "max_model_len": self.context}

    def check_common(self, body, request: Request):
        self.rate_limit(request)
        self.check_model(body.model)
        if body.logprobs:
            raise APIError(422, "logprobs are not supported by this server.", param="logprobs",
                           code="unsupported_parameter")
        if body.n > self.config.max_n:
            raise APIError(422, f"'n' must be at most {self.config.max_n} (got {body.n}).", param="n",
                           code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise APIError(422, "'stop' takes at most 16 non-empty strings of at most 256 characters.",
                           param="stop", code="invalid_value")

    def budget(self, prompt_tokens: int, requested: int | None, default: int) -> int:
        """max_tokens for a prompt, or the vLLM-worded context-length error."""
        M, P = self.context, prompt_tokens
        if P > self.max_prompt:
            raise APIError(400, f"This model's maximum context length is {M} tokens. However, your request has "
                           f"{P} input tokens (at most {self.max_prompt} allowed). Please reduce the length "
                           "of the input.", param="messages", code="context_length_exceeded")
        if requested is None:
            return max(1, min(default, self.max_tokens, M - P))
        if requested > M - P:
            raise APIError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This "
                           f"model's maximum context length is {M} tokens and your request has {P} input "
                           f"tokens ({requested} > {M} - {P}).", param="max_tokens",
                           code="context_length_exceeded")
        if requested > self.max_tokens:
            raise APIError(400, f"'max_tokens' is too large: {requested}. This server allows at most "
                           f"{self.max_tokens} generated tokens.", param="max_tokens", code="invalid_value")
        return requested

    def sampling(self, body, max_tokens: int, choice: int) -> SamplingParams:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
        seed = None if body.seed is None else body.seed + choice
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, seed=seed,
                              stop=tuple(stops), ignore_eos=body.ignore_eos)

    def check_input(self, texts: list[str], request_id: str) -> Decision | None:
        """Apply input rules; every decision is audited. Returns the refusing decision, if any."""
        if self.policy is None:
            return None
        decisions = self.policy.check("\n".join(texts), "input")
        for d in decisions:
            self.policy.audit(d, source="serve", request_id=request_id)
        return next((d for d in decisions if d.refuses), None)

    # ---- endpoints ------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request):
        self.check_common(body, request)
        if body.tools:
            raise APIError(422, "tools are not supported by this server.", param="tools",
                           code="unsupported_parameter")
        if len(body.messages) > self.config.max_messages:
            raise APIError(400, f"Too many messages: {len(body.messages)} (at most {self.config.max_messages}).",
                           param="messages", code="invalid_value")
        messages = []
        for m in body.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.role == "assistant" and m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            messages.append(msg)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            prompt, thinking = self.tokenizer.chat_prompt(messages)
        except (DataError, ValueError) as e:
            raise APIError(400, f"Invalid messages: {e}", param="messages", code="invalid_value") from None
        except Exception as e:  # a folder's Jinja template raising (e.g. on role order)
            raise APIError(400, f"The chat template rejected the messages: {type(e).__name__}",
                           param="messages", code="invalid_value") from None
        max_tokens = self.budget(len(prompt), body.max_completion_tokens or body.max_tokens,
                                 self.config.default_max_tokens)
        run = _Run(self, rid, "chat", len(prompt), body.stream,
                   body.stream_options is not None and body.stream_options.include_usage, thinking)
        refusal = self.check_input([m["content"] for m in messages if m["role"] == "user"], rid)
        if refusal is not None:
            return run.refused(refusal, body.n)
        params = [self.sampling(body, max_tokens, i) for i in range(body.n)]
        return await run.start([prompt] * body.n, params, request)

    async def complete(self, body: CompletionRequest, request: Request):
        self.check_common(body, request)
        prompts, texts = self.completion_prompts(body.prompt)
        rid = f"cmpl-{uuid.uuid4().hex}"
        lengths = [len(p) for p in prompts]
        max_tokens = min(self.budget(P, body.max_tokens, 16) for P in lengths)  # raises for any prompt too long
        run = _Run(self, rid, "completion", sum(lengths), body.stream,
                   body.stream_options is not None and body.stream_options.include_usage, False)
        refusal = self.check_input(texts, rid)
        if refusal is not None:
            return run.refused(refusal, body.n * len(prompts))
        all_prompts, params, echo = [], [], []
        for p, text in zip(prompts, texts):
            for j in range(body.n):
                all_prompts.append(p)
                params.append(self.sampling(body, max_tokens, len(params)))
                echo.append(text)
        run.echo = echo if body.echo else None
        return await run.start(all_prompts, params, request)

    def completion_prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if len(prompt) > 64:
            raise APIError(400, "At most 64 prompts per request.", param="prompt", code="invalid_value")
        ids, texts = [], []
        V = self.scheduler.engine.config.vocab_size
        for p in prompt:
            if isinstance(p, str):
                texts.append(p)
                p = self.tokenizer.encode(p)
            else:
                if any(not 0 <= t < V for t in p):
                    raise APIError(400, f"'prompt' has token ids outside the vocabulary [0, {V}).",
                                   param="prompt", code="invalid_value")
                texts.append(self.tokenizer.decode(p))
            if not p:
                raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
            ids.append(p)
        return ids, texts


class _Run:
    """One API request: its choices' engine requests, and the JSON or SSE answer built from them."""

    def __init__(self, api: _Api, rid: str, kind: str, prompt_tokens: int, stream: bool, include_usage: bool,
                 thinking: bool):
        self.api, self.rid, self.kind = api, rid, kind
        self.prompt_tokens, self.stream, self.include_usage, self.thinking = prompt_tokens, stream, include_usage, \
            thinking
        self.created = int(time.time())
        self.model = api.config.model_name
        self.choices: list[ChoiceStream] = []
        self.echo: list[str] | None = None  # completions: prompt text to put before each choice's text

    # ---- starting -------------------------------------------------------------------------------
    async def start(self, prompts: list[list[int]], params: list[SamplingParams], request: Request):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        policy, tok = self.api.policy, self.api.tokenizer
        for _ in prompts:
            monitor = policy.monitor() if policy is not None and policy.has_output_rules else None
            self.choices.append(ChoiceStream(self.thinking, monitor, tok.end_think_id, split=self.kind == "chat"))
        sinks = [self._sink(loop, i) for i in range(len(prompts))]
        try:
            self.ids = self.api.scheduler.submit_many(prompts, params, sinks)
        except QueueFull:
            raise APIError(503, "The server is overloaded (request queue full). Retry shortly.",
                           type="server_error", code="overloaded", headers={"Retry-After": "1"}) from None
        except SchedulerClosed:
            raise APIError(503, "The generation engine is not running.", type="server_error",
                           code="unavailable") from None
        self.open = set(range(len(prompts)))
        if self.stream:
            return StreamingResponse(self._sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request)

    def _sink(self, loop, index: int):
        def put(out):
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
        return put

    def _cancel_open(self):
        for i in self.open:
            self.api.scheduler.cancel(self.ids[i])

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
            delta = self.choices[index].feed(out)
            for flag in delta.flags:
                self.api.policy.audit(flag, source="serve", request_id=self.rid)
            if delta.refusal is not None:
                self.api.policy.audit(delta.refusal, source="serve", request_id=self.rid)
                if not out.finished:
                    self.api.scheduler.cancel(self.ids[index])
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
        return JSONResponse(self._final_body())

    def _final_body(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            content = c.content
            if c.refusal is not None:
                content = (content + "\n\n" if content else "") + c.refusal.message
            if self.kind == "chat":
                message = {"role": "assistant", "content": content}
                if self.thinking or c.reasoning:
                    message["reasoning_content"] = message["reasoning"] = c.reasoning
                if c.refusal is not None:
                    message["refusal"] = c.refusal.message
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": c.finish_reason})
            else:
                text = (self.echo[i] if self.echo else "") + content
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": c.finish_reason})
        return {"id": self.rid, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self._usage()}

    def _usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.choices)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        if self.kind == "chat":
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(c.reasoning_tokens for c in self.choices)}
        return usage

    # ---- streaming ------------------------------------------------------------------------------
    def _chunk(self, index: int, delta: dict | None, finish_reason: str | None = None, text: str | None = None) -> str:
        if self.kind == "chat":
            choice = {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        body = {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _delta_chunks(self, index: int, d: Delta) -> list[str]:
        out = []
        if self.kind == "chat":
            if d.reasoning:
                out.append(self._chunk(index, {"reasoning_content": d.reasoning, "reasoning": d.reasoning}))
            content = d.content
            if d.refusal is not None:
                content += ("\n\n" if self.choices[index].content else "") + d.refusal.message
            if content:
                out.append(self._chunk(index, {"content": content}))
            if d.finished:
                out.append(self._chunk(index, {}, d.finish_reason))
        else:
            text = d.content + (d.refusal.message if d.refusal is not None else "")
            if text or d.finished:
                out.append(self._chunk(index, None, d.finish_reason if d.finished else None, text))
        return out

    def _usage_chunk(self) -> str:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self._usage()}
        return f"data: {json.dumps(body)}\n\n"

    async def _sse(self):
        pending = None
        try:
            for i in range(len(self.choices)):
                if self.kind == "chat":
                    yield self._chunk(i, {"role": "assistant", "content": ""})
                elif self.echo:
                    yield self._chunk(i, None, text=self.echo[i])
            while self.open:
                pending = pending or asyncio.ensure_future(self._next())
                done, _ = await asyncio.wait({pending}, timeout=self.api.config.keepalive_s)
                if not done:
                    yield ": keep-alive\n\n"
                    continue
                task, pending = pending, None
                try:
                    deltas = task.result()
                except APIError as e:
                    yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
                    break
                for index, d in deltas:
                    for chunk in self._delta_chunks(index, d):
                        yield chunk
            if self.include_usage:
                yield self._usage_chunk()
            yield "data: [DONE]\n\n"
        finally:  # the client disconnected (the response task is cancelled) or we are done
            if pending is not None:
                pending.cancel()
            self._cancel_open()

    # ---- refusal of the input -------------------------------------------------------------------
    def refused(self, decision: Decision, n: int):
        """Answer with the rule's message (finish_reason content_filter), without running the model."""
        for _ in range(n):
            c = ChoiceStream(False, split=False)
            c.refusal, c.finish_reason = decision, "content_filter"
            self.choices.append(c)
        if not self.stream:
            return JSONResponse(self._final_body())

        async def sse():
            for i in range(n):
                if self.kind == "chat":
                    yield self._chunk(i, {"role": "assistant", "content": ""})
                for chunk in self._delta_chunks(i, Delta(refusal=decision, finished=True,
                                                         finish_reason="content_filter")):
                    yield chunk
            if self.include_usage:
                yield self._usage_chunk()
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream")


class BodyLimit:
    """ASGI middleware: read request bodies up to `limit` bytes, answer 413 beyond (draining a little
    more so the client sees the answer rather than a reset), and replay the body to the app."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                too_big = True
            if not too_big:
                chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
            if too_big and size > 16 * self.limit:
                break
        if too_big:
            body = json.dumps(error_body(f"Request body too large: the limit is {self.limit} bytes.",
                                         "invalid_request_error", None, "body_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
