"""``MStarClient``: the Python SDK over a running mstar server (requests + numpy, no torch).

It mirrors the in-process :class:`mstar.Engine` API and returns the very
same types (:class:`~mstar.types.GenerateResult`, :class:`~mstar.types.AudioBuffer`
and the stream events), so code moves between the two unchanged.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import requests

from mstar._sugar import GenerateSugar
from mstar.describe import ModelDescription
from mstar.errors import InvalidRequestError, NotFoundError, ProtocolError, TransportError
from mstar.media import MediaArg
from mstar.protocol import check_request_id
from mstar.types import GenerateResult

from .form import build_form
from .speech_stream import SpeechStream, open_speech_stream
from .stream import ClientEventStream
from .transport import Timeout, Transport, error_from_response, json_body

__all__ = ["API_KEY_ENV", "DEFAULT_TIMEOUT", "MStarClient"]

# (connect, read): fail fast when nobody listens; give slow generations ten minutes.
DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 600.0)
#: Read when ``api_key`` is not given: the variable ``mstar-server`` reads its key from.
API_KEY_ENV = "MSTAR_API_KEY"


class MStarClient(GenerateSugar[ClientEventStream]):
    """A thin HTTP client for an mstar server.

    >>> client = MStarClient("http://localhost:8000")
    >>> client.chat("Hello!").text

    ``timeout`` is seconds, or a ``(connect, read)`` pair; the read timeout
    bounds the wait for each piece of the answer, not the whole stream.
    ``api_key`` is sent as a bearer token; when it is None the client reads
    ``$MSTAR_API_KEY`` (pass ``api_key=""`` to send none). A missing or wrong
    key raises :class:`~mstar.errors.AuthenticationError` from every call.
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
            api_key=os.environ.get(API_KEY_ENV) if api_key is None else api_key,
            retries=retries,
            session=session,
            backoff=backoff,
            max_backoff=max_backoff,
            sleep=sleep,
        )

    @property
    def base_url(self) -> str:
        """The server's address, as given (without a trailing slash)."""
        return self._http.base_url

    @property
    def session(self) -> requests.Session:
        """The ``requests.Session`` every call goes through (yours, if you passed one)."""
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
        output_modalities: Sequence[str] | str | None = None,
        input_modalities: Sequence[str] | str | None = None,
        stream: bool = False,
        request_id: str | None = None,
        **model_kwargs: Any,
    ) -> GenerateResult | ClientEventStream:
        """Submit one request to ``POST /generate``.

        Media arguments take a path, raw ``bytes``, a ``(filename, bytes)``
        tuple, or a list of those. Extra keyword arguments are the model's
        ``model_kwargs`` (``None`` values are dropped). Without ``output_modalities``
        the server picks what the model always produces (``describe().default_output_modalities``).
        Returns a :class:`GenerateResult`, or with ``stream=True`` a
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

    def speech_stream(self, *, voice: str | None = None, seed: int | None = None, **params: Any) -> SpeechStream:
        """Open a WebSocket speech stream (``/v1/audio/speech/stream``): send text as it is written
        and receive each sentence's audio as soon as the sentence is complete. ``params`` are
        further ``session.config`` fields (``temperature``, ``top_p``, ``max_new_tokens``, the
        model's own parameters). Needs ``pip install websockets``; see :mod:`mstar.client.speech_stream`.
        """
        config: dict[str, Any] = {k: v for k, v in {"voice": voice, "seed": seed, **params}.items() if v is not None}
        connect, read = self._http.timeout if isinstance(self._http.timeout, tuple) else (self._http.timeout,) * 2
        return open_speech_stream(
            self.base_url, self._http.headers, connect_timeout=connect, read_timeout=read, config=config
        )

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

        An unreachable or failing server gives False, so this can be polled
        while a server starts. The one answer that raises is 401/403
        (:class:`~mstar.errors.AuthenticationError`): waiting will not fix a
        wrong key (mstar's own ``/health`` needs none, a proxy's may).
        """
        try:
            resp = self._http.request("GET", "/health", retry=False, raise_for_status=False)
            _raise_for_auth(resp)
            ok = resp.status_code == 200
            doc = json_body(resp)
        except TransportError:
            return False
        return ok and isinstance(doc, dict) and doc.get("status") == "healthy"

    def ready(self) -> bool:
        """True once the model is loaded and requests are accepted (``GET /ready`` is 200).

        False while the model loads (503) or the server is unreachable; a
        missing or wrong API key raises :class:`~mstar.errors.AuthenticationError`
        instead, since no amount of polling would make it True.
        """
        try:
            resp = self._http.request("GET", "/ready", retry=False, raise_for_status=False)
        except TransportError:
            return False
        _raise_for_auth(resp)
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
        _raise_for_auth(resp)
        ready = json_body(resp)
        name = ready.get("model") if isinstance(ready, dict) else None
        return [{"id": name, "object": "model", "owned_by": "mstar"}] if isinstance(name, str) and name else []

    def describe(self) -> ModelDescription:
        """The served model's inputs, outputs, voices and parameters (``GET /describe``): the same
        :class:`~mstar.describe.ModelDescription` as ``Engine.describe()``. While the model loads,
        ``engine`` is None (the registry's description)."""
        doc = self._http.get_json("/describe")
        try:
            return ModelDescription.from_dict(doc)
        except ValueError as exc:
            raise ProtocolError(f"/describe did not answer a model description: {exc}") from exc

    def close(self) -> None:
        """Close the session (only when the client created it)."""
        self._http.close()

    def __enter__(self) -> MStarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for_auth(resp: requests.Response) -> None:
    """Raise the server's AuthenticationError for a 401/403 answer of a route read without raising."""
    if resp.status_code in (401, 403):
        try:
            raise error_from_response(resp)
        finally:
            resp.close()
