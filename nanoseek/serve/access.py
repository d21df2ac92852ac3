"""Who may call and how much: the API-key check, the per-client rate limiter and the ASGI middleware
that caps request bodies (413)."""

from __future__ import annotations

import collections
import hmac
import json
import time

from fastapi import Request

from .config import ServerConfig
from .wire import APIError


def authorize(config: ServerConfig, request: Request) -> None:
    """401 unless the request carries the server's key (`Authorization: Bearer` or `api-key`); no key: open."""
    key = config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("api-key", "")
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class RateLimiter:
    """At most config.rate_limit requests per client (API key or address) in any 60 s; 0: off.
    The limit is read per call, so changing the config takes effect at once."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.hits: dict[str, collections.deque] = {}  # client -> monotonic times of its recent requests

    def check(self, request: Request) -> None:
        limit = self.config.rate_limit
        if limit <= 0:
            return
        client = request.headers.get("authorization") or (request.client.host if request.client else "?")
        now = time.monotonic()
        hits = self.hits.setdefault(client, collections.deque())
        while hits and now - hits[0] > 60:
            hits.popleft()
        if len(hits) >= limit:
            raise APIError(429, f"Rate limit reached: {limit} requests per minute. Retry later.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(60 - (now - hits[0])) + 1))})
        hits.append(now)


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
            return await self._too_large(send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        error = APIError(413, f"Request body too large: the limit is {self.limit} bytes.", code="body_too_large")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
