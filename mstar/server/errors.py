"""The one place where exceptions become HTTP error responses.

Every error, on every route and mid-stream too (see :mod:`mstar.server.sse`), has the OpenAI shape
``{"error": {"message", "type", "param", "code"}}`` with a string ``code``:
mstar's typed errors carry their own ``status_code`` and ``code``; framework
errors (unknown route, wrong method, oversized body) are mapped to the
matching mstar error; anything else is a 500 whose detail stays in the log.
The handlers also count the failed request in the metrics (:func:`~mstar.server.metrics.finish_request`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from mstar.errors import (  # BodyTimeoutError, MethodNotAllowedError: defined with the others, re-exported here
    BodyTimeoutError,
    DrainingError,
    InvalidRequestError,
    MethodNotAllowedError,
    MStarError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    RequestError,
    ServiceError,
)
from mstar.server.metrics import finish_request
from mstar.server.streaming import ClientDisconnected
from mstar.types import ErrorChunk

__all__ = [
    "BodyTimeoutError",
    "MethodNotAllowedError",
    "as_mstar_error",
    "error_body",
    "error_chunk",
    "error_response",
    "exception_handlers",
]

log = logging.getLogger("mstar.server")


def as_mstar_error(exc: BaseException) -> MStarError:
    """Map any exception onto the mstar error that describes it to a client."""
    if isinstance(exc, MStarError):
        return exc
    if isinstance(exc, HTTPException):
        status = exc.status_code
        detail = str(exc.detail or "")
        if status == 404:
            return NotFoundError(detail or "no such route")
        if status == 405:
            return MethodNotAllowedError(detail or "method not allowed")
        if status == 413:
            return PayloadTooLargeError("the request body is larger than this server accepts (see --max-upload-mb)")
        if 400 <= status < 500:
            err = InvalidRequestError(detail or "bad request")
            err.status_code = status
            return err
    log.error("unhandled server error", exc_info=exc)
    return MStarError(f"internal server error ({type(exc).__name__})")


def _error_type(err: MStarError) -> str:
    if err.status_code == 401:
        return "authentication_error"
    if err.status_code == 404:
        return "not_found_error"
    if err.status_code == 429:
        return "rate_limit_error"
    if isinstance(err, RequestError) or 400 <= err.status_code < 500:
        return "invalid_request_error"
    if isinstance(err, ServiceError):
        return "service_unavailable_error"
    return "server_error"


def error_body(exc: BaseException) -> dict[str, Any]:
    """The OpenAI-shaped error document for ``exc``."""
    err = as_mstar_error(exc)
    return {
        "error": {
            "message": err.message if isinstance(err, MStarError) else str(err),
            "type": _error_type(err),
            "param": getattr(err, "param", None),
            "code": str(err.code),
        }
    }


def _headers(err: MStarError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if isinstance(err, (RateLimitError, DrainingError)) or err.status_code in (429, 503):
        retry = getattr(err, "retry_after", None) or 1.0
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    if err.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_response(exc: BaseException) -> Response[Any]:
    err = as_mstar_error(exc)
    return Response(content=error_body(err), status_code=err.status_code, headers=_headers(err), media_type="application/json")


def error_chunk(exc: BaseException) -> ErrorChunk:
    """The in-band NDJSON error line for ``exc`` (after streaming began)."""
    err = as_mstar_error(exc)
    return ErrorChunk(status=err.status_code, message=err.message, code=str(err.code), param=err.param)


def _handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, HTTPException) and exc.status_code == 413:
        limit = getattr(request.app, "request_max_body_size", None)
        if isinstance(limit, int) and limit > 0:
            exc = PayloadTooLargeError(
                f"the request body is larger than this server's {limit / (1024 * 1024):.3g} MiB body limit "
                "(six uploads of --max-upload-mb, plus 1 MiB for the other fields)"
            )
    if isinstance(exc, HTTPException) and exc.status_code in (404, 405):
        # Litestar's own text ("Not Found") does not say what was not found.
        what = "no such route" if exc.status_code == 404 else "method not allowed on"
        exc = as_mstar_error(exc)
        exc.message = f"{what}: {request.method} {request.url.path}"
    err = as_mstar_error(exc)
    finish_request(request, err.status_code, str(err.code))
    return error_response(err)


def _gone(request: Request[Any, Any, Any], _exc: Exception) -> Response[Any]:
    # Nobody is listening; 499 (client closed request) shows up in access logs.
    finish_request(request, 499)
    return Response(b"", status_code=499)


exception_handlers: dict[type[Exception] | int, Any] = {
    Exception: _handler,
    HTTPException: _handler,
    MStarError: _handler,
    ClientDisconnected: _gone,
}
