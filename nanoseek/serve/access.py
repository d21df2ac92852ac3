"""Who may call and how much: the API-key check, the per-client rate limiter and the ASGI middleware
that caps request bodies (413)."""

from __future__ import annotations

import collections
import hmac
import itertools
import json
import threading
import time

from fastapi import Request

from .config import ServerConfig
from .wire import APIError


def uvicorn_options(forwarded_allow_ips: str | None = None) -> dict:
    """uvicorn.Config options for the client's address: the socket's peer, unless the request comes
    from one of `forwarded_allow_ips` (a reverse proxy: comma-separated IPs or networks), whose
    X-Forwarded-For is then believed. (uvicorn's default believes any loopback peer, so a client on
    the same host could claim any address and dodge the rate limit.)"""
    if not forwarded_allow_ips:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": forwarded_allow_ips}


def client_address(request: Request) -> str:
    """The peer's address as the ASGI server reports it (see `uvicorn_options`); never a header the
    app reads itself."""
    return request.client.host if request.client else "?"


def given_key(request: Request) -> str:
    """The key a request carries: `Authorization: Bearer KEY` (any case of "Bearer"), else `api-key: KEY`."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("api-key", "").strip()


def authorize(config: ServerConfig, request: Request, limiter: "RateLimiter | None" = None) -> None:
    """401 unless the request carries the server's key; no key: open. A wrong key counts against the
    client's failure budget (`limiter`), so guessing keys is throttled with 429."""
    key = config.api_key
    if key is None:
        return
    given = given_key(request)
    if given and hmac.compare_digest(given.encode("utf-8", "replace"), key.encode()):
        return
    if limiter is not None:
        limiter.failed(request)
    raise APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


WINDOW_S = 60.0


class _Window:
    """Recent events per client in a sliding 60 s window, for at most `max_clients` clients (the least
    recently seen are forgotten first; a client idle for 60 s has nothing to remember)."""

    def __init__(self, max_clients: int):
        self.max_clients = max_clients
        self.hits: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def recent(self, client: str, now: float) -> collections.deque:
        hits = self.hits.pop(client, None) or collections.deque()
        while hits and now - hits[0] > WINDOW_S:
            hits.popleft()
        self.hits[client] = hits  # most recently seen last
        while len(self.hits) > self.max_clients:
            self.hits.popitem(last=False)
        self._expire(now, client)
        return hits

    def _expire(self, now: float, keep: str):
        """Forget the clients seen longest ago that have nothing in the window (amortised O(1))."""
        for client in list(itertools.islice(self.hits, 64)):
            hits = self.hits[client]
            if client == keep or (hits and now - hits[-1] <= WINDOW_S):
                break
            del self.hits[client]

    def clear(self):
        self.hits.clear()

    def __len__(self):
        return len(self.hits)


class RateLimiter:
    """At most config.rate_limit requests per client address in any 60 s (0: off), and at most
    config.auth_failure_limit requests with a wrong or missing key (0: off), whatever the limit.

    The client is the peer address (`client_address`): headers a client picks (Authorization,
    X-Forwarded-For) would give each request a fresh budget. The table keeps at most
    config.rate_limit_clients addresses. Limits are read per call, so changing the config takes effect
    at once."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.hits = _Window(config.rate_limit_clients)  # client -> monotonic times of its recent requests
        self.failures = _Window(config.rate_limit_clients)  # client -> times of its rejected keys
        self._lock = threading.Lock()

    def check(self, request: Request) -> None:
        """429 for a client over either limit; else count the request."""
        client, now = client_address(request), time.monotonic()
        with self._lock:
            failures = self.failures.recent(client, now)
            self._refuse_over(failures, self.config.auth_failure_limit, now,
                              "Too many requests with a wrong API key")
            limit = self.config.rate_limit
            if limit <= 0:
                return
            hits = self.hits.recent(client, now)
            self._refuse_over(hits, limit, now, "Rate limit reached")
            hits.append(now)

    def failed(self, request: Request) -> None:
        """Count a rejected key for the request's client (nothing to count with the budget off)."""
        if self.config.auth_failure_limit <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self.failures.recent(client_address(request), now).append(now)

    @staticmethod
    def _refuse_over(hits: collections.deque, limit: int, now: float, what: str):
        if limit > 0 and len(hits) >= limit:
            raise APIError(429, f"{what}: {limit} requests per minute. Retry later.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(WINDOW_S - (now - hits[0])) + 1))})


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
