"""The HTTP layer of the client: one ``requests.Session``, retries, and typed errors.

Everything ``requests`` can raise is turned into a subclass of
:class:`mstar.errors.TransportError`, and every HTTP error answer into the
exception :func:`mstar.errors.error_for_status` names for its ``code`` and
status (the class the Engine raised), carrying the server's own message. ``429`` and ``503`` answers are retried with exponential backoff
that honours ``Retry-After``.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import requests

from mstar.errors import (
    ConnectError,
    InvalidParameterError,
    MStarError,
    ProtocolError,
    ReadTimeoutError,
    TransportError,
    error_for_status,
)

__all__ = ["RETRY_STATUSES", "Timeout", "Transport", "error_from_response", "parse_retry_after", "transport_error"]

Timeout = float | tuple[float, float]
# Only answers that say "not now" are retried: the request was not run, so resending is safe.
RETRY_STATUSES = frozenset({429, 503})
_MAX_ERROR_TEXT = 1000


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = datetime.now(UTC).timestamp() if now is None else now
        seconds = when.timestamp() - current
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _error_fields(resp: requests.Response) -> tuple[str, str | None, str | None]:
    """(message, code, param) from an error body of any of the shapes servers send."""
    body = resp.content or b""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc: Any = json.loads(text) if text else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and err.get("message"):
            code = err.get("code")
            param = err.get("param")
            return str(err["message"]), str(code) if code else None, str(param) if param else None
        if isinstance(err, str) and err:
            return err, None, None
        detail = doc.get("detail", doc.get("message"))
        if isinstance(detail, str) and detail:
            return detail, None, None
        if detail is not None:
            return json.dumps(detail)[:_MAX_ERROR_TEXT], None, None
    if text:
        return text[:_MAX_ERROR_TEXT], None, None
    return f"HTTP {resp.status_code} {resp.reason or ''}".strip(), None, None


def error_from_response(resp: requests.Response) -> MStarError:
    """The typed exception for an HTTP error answer, with the server's message."""
    message, code, param = _error_fields(resp)
    return error_for_status(
        resp.status_code, message, code=code, param=param, retry_after=parse_retry_after(resp.headers.get("Retry-After"))
    )


def transport_error(exc: BaseException, url: str) -> TransportError:
    """Map a ``requests`` exception (raised sending or while streaming) to a typed one."""
    # While streaming, requests wraps urllib3's read timeout in a ConnectionError.
    inner = exc.args[0] if exc.args else None
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return ConnectError(f"timed out connecting to {url}")
    if isinstance(exc, requests.exceptions.ReadTimeout) or type(inner).__name__ == "ReadTimeoutError":
        return ReadTimeoutError(f"timed out waiting for {url} to answer")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return ProtocolError(f"the connection to {url} broke mid-response: {exc}")
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return ProtocolError(f"the response from {url} could not be decoded: {exc}")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return ConnectError(f"could not connect to {url}: {exc}")
    return TransportError(f"request to {url} failed: {exc}")


class Transport:
    """Sends requests to one server, retrying the answers that mean "try again later"."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: Timeout,
        api_key: str | None,
        retries: int,
        session: requests.Session | None,
        backoff: float,
        max_backoff: float,
        sleep: Callable[[float], None],
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidParameterError(
                f"base_url must start with http:// or https://, got {base_url!r}", param="base_url"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidParameterError(f"retries must be a non-negative integer, got {retries!r}", param="retries")
        self.base_url = base_url.rstrip("/")
        self.timeout = _check_timeout(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.sleep = sleep
        self.session = session if session is not None else requests.Session()
        self._owns_session = session is None
        self.headers: dict[str, str] = {"Accept": "application/json, application/x-ndjson"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (capped at ``max_backoff``)."""
        wanted = retry_after if retry_after is not None else self.backoff * (2**attempt)
        return min(max(0.0, wanted), self.max_backoff)

    def request(
        self,
        method: str,
        path: str,
        *,
        data: Mapping[str, str] | None = None,
        files: list[Any] | None = None,
        stream: bool = False,
        retry: bool = True,
        raise_for_status: bool = True,
    ) -> requests.Response:
        """Send one request; retry 429/503; raise typed errors for failures and error statuses."""
        url = self.url(path)
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                resp = self.session.request(
                    method, url, data=data, files=files, headers=self.headers, timeout=self.timeout, stream=stream
                )
            except requests.exceptions.RequestException as exc:
                raise transport_error(exc, url) from exc
            if resp.status_code in RETRY_STATUSES and attempt + 1 < attempts:
                wait = self.delay(attempt, parse_retry_after(resp.headers.get("Retry-After")))
                resp.close()
                self.sleep(wait)
                continue
            if raise_for_status and resp.status_code >= 400:
                try:
                    raise error_from_response(resp)
                finally:
                    resp.close()
            return resp
        raise AssertionError("unreachable: the last attempt always returns or raises")

    def get_json(self, path: str) -> Any:
        """GET ``path`` and return its JSON body (ProtocolError when it is not JSON)."""
        resp = self.request("GET", path)
        return json_body(resp)

    def close(self) -> None:
        if self._owns_session:
            self.session.close()


def json_body(resp: requests.Response) -> Any:
    """The JSON body of a successful answer; ProtocolError naming the problem otherwise."""
    try:
        return json.loads(resp.content)
    except ValueError as exc:
        snippet = resp.content[:200].decode("utf-8", "replace")
        raise ProtocolError(f"expected a JSON answer from {resp.url}, got {snippet!r}") from exc
    finally:
        resp.close()


def _check_timeout(timeout: Timeout) -> Timeout:
    if isinstance(timeout, tuple):
        if len(timeout) != 2 or not all(_positive(t) for t in timeout):
            raise InvalidParameterError(
                f"timeout must be seconds or a (connect, read) pair of seconds, got {timeout!r}", param="timeout"
            )
        return (float(timeout[0]), float(timeout[1]))
    if not _positive(timeout):
        raise InvalidParameterError(f"timeout must be a positive number of seconds, got {timeout!r}", param="timeout")
    return float(timeout)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
