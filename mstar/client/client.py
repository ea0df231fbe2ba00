"""``MStarClient``: the Python SDK over a running mstar server (requests + numpy, no torch).

It mirrors the in-process :class:`mstar.Engine` API and returns the very
same types (:class:`~mstar.types.GenerateResult`, :class:`~mstar.types.AudioBuffer`
and the stream events), so code moves between the two unchanged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import requests

from mstar._sugar import GenerateSugar
from mstar.errors import InvalidRequestError, NotFoundError, ProtocolError, TransportError
from mstar.media import MediaArg
from mstar.protocol import check_request_id
from mstar.types import GenerateResult

from .form import build_form
from .stream import ClientEventStream
from .transport import Timeout, Transport, json_body

__all__ = ["DEFAULT_TIMEOUT", "MStarClient"]

# (connect, read): fail fast when nobody listens; give slow generations ten minutes.
DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 600.0)


class MStarClient(GenerateSugar[ClientEventStream]):
    """A thin HTTP client for an mstar server.

    >>> client = MStarClient("http://localhost:8000")
    >>> client.chat("Hello!").text

    ``timeout`` is seconds, or a ``(connect, read)`` pair; the read timeout
    bounds the wait for each piece of the answer, not the whole stream.
    ``429`` and ``503`` answers are retried up to ``retries`` times, waiting
    ``backoff * 2**attempt`` seconds or the server's ``Retry-After``, at most
    ``max_backoff``. ``session`` lets you bring your own ``requests.Session``
    (proxies, TLS settings, or a fake adapter in tests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        api_key: str | None = None,
        retries: int = 2,
        session: requests.Session | None = None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._http = Transport(
            base_url,
            timeout=timeout,
            api_key=api_key,
            retries=retries,
            session=session,
            backoff=backoff,
            max_backoff=max_backoff,
            sleep=sleep,
        )

    @property
    def base_url(self) -> str:
        return self._http.base_url

    @property
    def session(self) -> requests.Session:
        return self._http.session

    def __repr__(self) -> str:
        return f"MStarClient({self.base_url!r})"

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        *,
        text: str | None = None,
        images: MediaArg | list[MediaArg] | None = None,
        audio: MediaArg | list[MediaArg] | None = None,
        video: MediaArg | list[MediaArg] | None = None,
        messages: list[dict[str, Any]] | None = None,
        output_modalities: Sequence[str] | str = ("text",),
        input_modalities: Sequence[str] | str | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **model_kwargs: Any,
    ) -> GenerateResult | ClientEventStream:
        """Submit one request to ``POST /generate``.

        Media arguments take a path, raw ``bytes``, a ``(filename, bytes)``
        tuple, or a list of those. Extra keyword arguments are the model's
        ``model_kwargs`` (``None`` values are dropped). Returns a
        :class:`GenerateResult`, or with ``stream=True`` a
        :class:`ClientEventStream` of typed events ending with ``Finished``.
        The request id is made here when not given, so it is known before the
        first event arrives (for :meth:`cancel`).
        """
        rid = check_request_id(request_id if request_id is not None else uuid.uuid4().hex)
        data, files = build_form(
            text=text,
            images=images,
            audio=audio,
            video=video,
            messages=messages,
            output_modalities=output_modalities,
            input_modalities=input_modalities,
            stream=stream,
            request_id=rid,
            model_kwargs=model_kwargs,
        )
        # Plain fields go as (None, value) parts: that keeps the body multipart even without files.
        parts: list[Any] = [(name, (None, value)) for name, value in data.items()]
        resp = self._http.request("POST", "/generate", files=parts + files, stream=stream)
        if stream:
            # The server echoes the id it uses; prefer it should it differ from the one we sent.
            return ClientEventStream(resp, resp.headers.get("X-Request-Id") or rid)
        doc = json_body(resp)
        try:
            result = GenerateResult.from_json(doc)
        except ValueError as exc:
            raise ProtocolError(f"the /generate answer is not a result document: {exc}") from exc
        if not result.request_id:
            result.request_id = rid
        return result

    # ------------------------------------------------------------------ control
    def cancel(self, request_id: str) -> bool:
        """Cancel an in-flight request by id. Returns False if the server no longer knows it."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("cancel needs a request_id", param="request_id")
        try:
            resp = self._http.request("POST", f"/cancel/{quote(request_id, safe='')}")
        except NotFoundError:
            return False
        if not resp.content.strip():
            resp.close()
            return True
        doc = json_body(resp)
        if isinstance(doc, dict):
            for key in ("cancelled", "canceled", "ok"):
                if key in doc:
                    return bool(doc[key])
        return True

    def health(self) -> bool:
        """True if the server answers ``GET /health`` with ``{"status": "healthy"}``.

        An unreachable or failing server gives False (never raises), so this
        can be polled while a server starts.
        """
        try:
            resp = self._http.request("GET", "/health", retry=False, raise_for_status=False)
            ok = resp.status_code == 200
            doc = json_body(resp)
        except TransportError:
            return False
        return ok and isinstance(doc, dict) and doc.get("status") == "healthy"

    def ready(self) -> bool:
        """True once the model is loaded and requests are accepted (``GET /ready`` is 200)."""
        try:
            resp = self._http.request("GET", "/ready", retry=False, raise_for_status=False)
        except TransportError:
            return False
        resp.close()
        return resp.status_code == 200

    def list_models(self) -> list[dict[str, Any]]:
        """The models the server serves, one dict per model with at least ``id``.

        ``GET /v1/models`` lists only models with an OpenAI surface; for the
        others the served model's name comes from ``GET /ready``.
        """
        doc = self._http.get_json("/v1/models")
        entries = doc.get("data") if isinstance(doc, dict) else doc
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
            raise ProtocolError(f"/v1/models did not answer a list of models: {str(doc)[:200]!r}")
        if entries:
            return entries
        resp = self._http.request("GET", "/ready", retry=False, raise_for_status=False)
        ready = json_body(resp)
        name = ready.get("model") if isinstance(ready, dict) else None
        return [{"id": name, "object": "model", "owned_by": "mstar"}] if isinstance(name, str) and name else []

    def close(self) -> None:
        """Close the session (only when the client created it)."""
        self._http.close()

    def __enter__(self) -> MStarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
