"""What goes on the wire besides the answers' objects: OpenAI's error body, the mapping of every
exception to a status and that body, and the server-sent-events framing of the streams."""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("nanoseek.serve")
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                "multiple_of"}


class APIError(Exception):
    """An error answer: HTTP status, OpenAI error fields and extra headers (Retry-After, ...)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


ERROR_SCHEMA = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "integer", "null"]}}}}}}}}
ERROR_RESPONSES = {code: {"description": text, **ERROR_SCHEMA} for code, text in (
    (400, "malformed body or prompt too long"), (401, "missing or wrong API key"), (404, "unknown model"),
    (413, "body too large"), (422, "parameter out of range or unsupported"), (429, "rate limited"),
    (503, "queue full or engine down"))}


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error with OpenAI's body: ours, pydantic's, Starlette's (404/405) and the unexpected."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = {404: "Not found", 405: "Method not allowed"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, message, code=e.status_code,
                                       headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, "internal server error", type="server_error"))


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


# ---- server-sent events -----------------------------------------------------------------------------
SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"
NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(obj: dict, ascii_only: bool = False) -> str:
    """One `data:` event. Usage and error events have always escaped non-ASCII (ascii_only=True);
    chunks carry text as is."""
    return f"data: {json.dumps(obj, ensure_ascii=ascii_only)}\n\n"


def sse_response(events: AsyncIterator[str], headers: dict | None = NO_BUFFERING) -> StreamingResponse:
    """A text/event-stream answer; proxies are asked not to buffer it unless headers=None."""
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
