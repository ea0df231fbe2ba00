"""Exceptions raised by mstar: the Engine, the server and the client share them.

The hierarchy, so you know what to catch::

    MStarError
    ├── RequestError                  the request itself is wrong (HTTP 4xx)
    │   ├── InvalidRequestError       400: bad input of any kind
    │   │   ├── UnknownModelError
    │   │   ├── UnknownVoiceError
    │   │   ├── UnknownParameterError (an unknown model_kwargs key)
    │   │   ├── InvalidParameterError (a known key with a bad value)
    │   │   ├── UnsupportedModalityError
    │   │   ├── EmptyInputError
    │   │   ├── MediaError            (corrupt, unsupported or too-short media)
    │   │   │   └── MediaTooLargeError  413: over a decoding cap (also a PayloadTooLargeError)
    │   │   └── ShapeError            (tensor inputs of the wrong shape)
    │   ├── AuthenticationError       401
    │   ├── NotFoundError             404
    │   ├── MethodNotAllowedError     405
    │   ├── BodyTimeoutError          408: the request body arrived too slowly
    │   ├── ConflictError             409: a request_id already in flight
    │   └── PayloadTooLargeError      413
    ├── ServiceError                  the service cannot take it now (HTTP 429/503/504)
    │   ├── RateLimitError            429: queue full; carries ``retry_after``
    │   ├── NotReadyError             503: the model is still loading
    │   │   └── DrainingError         503: the server is shutting down; carries ``retry_after``
    │   ├── RequestTimeoutError       504: the request ran past its deadline
    │   ├── WorkerFailedError         503: a tensor-parallel worker died or failed a step
    │   └── ReplicaFailedError        503: the Ray Serve replica running the request died
    ├── ModelError                    500: the model failed while running this request
    ├── WeightsError                  weights missing, unreadable or of the wrong shape
    └── TransportError                client side: the server could not be reached or talked to
        ├── ConnectError
        ├── ReadTimeoutError
        └── ProtocolError             the server answered something that is not the protocol

Every exception has ``status_code`` (the HTTP status it maps to) and ``code``
(a short stable string, used as the OpenAI error ``code``). The server writes
``code`` into every error body and in-band error line; the client maps it back
with :func:`error_for_status`, so the same mistake raises the same class from
an in-process Engine and from :class:`~mstar.client.MStarClient`.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AuthenticationError",
    "BodyTimeoutError",
    "ConflictError",
    "ConnectError",
    "DrainingError",
    "EmptyInputError",
    "InvalidParameterError",
    "InvalidRequestError",
    "MStarError",
    "MediaError",
    "MethodNotAllowedError",
    "MediaTooLargeError",
    "ModelError",
    "NotFoundError",
    "NotReadyError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RateLimitError",
    "ReplicaFailedError",
    "ReadTimeoutError",
    "RequestError",
    "RequestTimeoutError",
    "ServiceError",
    "ShapeError",
    "TransportError",
    "UnknownModelError",
    "UnknownParameterError",
    "UnknownVoiceError",
    "UnsupportedModalityError",
    "WeightsError",
    "WorkerFailedError",
    "error_class_for_code",
    "error_for_status",
]


def _listing(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))


class MStarError(Exception):
    """Base of every mstar exception."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------- 4xx


class RequestError(MStarError):
    """The request is wrong; retrying it unchanged will fail again."""

    status_code = 400
    code = "invalid_request"


class InvalidRequestError(RequestError):
    status_code = 400
    code = "invalid_request"


class UnknownModelError(InvalidRequestError):
    code = "unknown_model"

    def __init__(self, name: str, available: Iterable[str]) -> None:
        super().__init__(f"unknown model {name!r}; available models: {_listing(available)}", param="model")
        self.name = name


class UnknownVoiceError(InvalidRequestError):
    code = "unknown_voice"

    def __init__(self, voice: str, available: Iterable[str]) -> None:
        self.available = list(available)
        super().__init__(f"unknown voice {voice!r}; valid voices: {', '.join(self.available)}", param="voice")


class UnknownParameterError(InvalidRequestError):
    code = "unknown_parameter"

    def __init__(self, names: Iterable[str], accepted: Iterable[str]) -> None:
        names = sorted(names)
        self.names = names
        self.accepted = sorted(accepted)
        super().__init__(
            f"unknown parameter(s) {', '.join(repr(n) for n in names)}; accepted: {', '.join(self.accepted)}",
            param=names[0] if names else None,
        )


class InvalidParameterError(InvalidRequestError):
    code = "invalid_parameter"


class UnsupportedModalityError(InvalidRequestError):
    code = "unsupported_modality"


class EmptyInputError(InvalidRequestError):
    code = "empty_input"


class MediaError(InvalidRequestError):
    code = "invalid_media"


class ShapeError(InvalidRequestError):
    code = "invalid_shape"


class AuthenticationError(RequestError):
    status_code = 401
    code = "invalid_api_key"


class NotFoundError(RequestError):
    status_code = 404
    code = "not_found"


class ConflictError(RequestError):
    status_code = 409
    code = "duplicate_request_id"


class PayloadTooLargeError(RequestError):
    status_code = 413
    code = "payload_too_large"


class MethodNotAllowedError(RequestError):
    status_code = 405
    code = "method_not_allowed"


class BodyTimeoutError(RequestError):
    """The client did not deliver its request body within the server's body timeout."""

    status_code = 408
    code = "body_timeout"


class MediaTooLargeError(MediaError, PayloadTooLargeError):
    """Media that would decode past a cap of :class:`mstar.media_limits.MediaLimits` (pixels, seconds, frames, bytes).

    Both a :class:`MediaError` and a :class:`PayloadTooLargeError`: 413, like every size limit.
    """

    status_code = 413
    code = "media_too_large"


# ---------------------------------------------------------------- service


class ServiceError(MStarError):
    """The service cannot take the request now; retrying later may work."""

    status_code = 503
    code = "service_unavailable"


class RateLimitError(ServiceError):
    status_code = 429
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReadyError(ServiceError):
    status_code = 503
    code = "not_ready"


class DrainingError(NotReadyError):
    """The server is shutting down (SIGTERM): it takes no new requests, and one still running when
    the grace period ends is stopped with this error. Retry on another replica after ``retry_after``."""

    code = "draining"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(ServiceError):
    status_code = 504
    code = "timeout"


class WorkerFailedError(ServiceError):
    """A tensor-parallel worker process died, hung past the collective timeout, or failed a step:
    the requests of that step fail with this error and the Engine reports itself unhealthy
    (``Engine.health()``; the server's ``/ready`` answers 503). A new Engine is needed."""

    status_code = 503
    code = "worker_failed"


class ReplicaFailedError(ServiceError):
    """The Ray Serve replica running this request died or became unreachable (``mstar.serve_ray``):
    its own in-flight requests fail with this error, the other replicas keep serving, and Ray
    starts a replacement. Retrying the request is safe; it lands on a live replica."""

    status_code = 503
    code = "replica_failed"


# ---------------------------------------------------------------- runtime


class ModelError(MStarError):
    """The model failed while running this request (other requests are unaffected)."""

    status_code = 500
    code = "model_error"


class WeightsError(MStarError):
    status_code = 500
    code = "weights_error"


# ---------------------------------------------------------------- client transport


class TransportError(MStarError):
    status_code = 0
    code = "transport_error"


class ConnectError(TransportError):
    code = "connect_error"


class ReadTimeoutError(TransportError):
    code = "read_timeout"


class ProtocolError(TransportError):
    code = "protocol_error"


_BY_STATUS: dict[int, type[MStarError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    429: RateLimitError,
    503: NotReadyError,
    504: RequestTimeoutError,
}


def _wire_classes() -> dict[str, type[MStarError]]:
    """``code`` -> class for every error of this module a server can send."""
    found: dict[str, type[MStarError]] = {}
    pending: list[type[MStarError]] = [MStarError]
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        # Only this module's classes: a subclass defined elsewhere (a test, a plugin) never changes the mapping.
        if cls.__module__ == __name__ and not issubclass(cls, TransportError):  # transport errors stay client-side
            found.setdefault(cls.code, cls)
    found["invalid_request"] = InvalidRequestError  # the 400 class users catch, not its abstract parent
    return found


_BY_CODE = _wire_classes()


def error_class_for_code(code: str | None, status: int | None = None) -> type[MStarError] | None:
    """The class whose ``code`` is ``code`` (and, when given, whose ``status_code`` is ``status``); None if none."""
    cls = _BY_CODE.get(code) if code else None
    if cls is None or (status is not None and cls.status_code != status):
        return None
    return cls


def error_for_status(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> MStarError:
    """Rebuild the exception a server reported (used by the client).

    The class is the one whose ``code`` and ``status_code`` both match, so the
    client raises what the Engine raised (``UnknownVoiceError``, ``ShapeError``,
    ...); a code this side does not know falls back to the class of the HTTP
    status. Class-specific constructor data (``UnknownVoiceError.available``)
    does not travel: the message carries it.
    """
    cls = error_class_for_code(code, status) or _BY_STATUS.get(status)
    if cls is None:
        cls = RequestError if 400 <= status < 500 else ModelError if status == 500 else ServiceError
    exc = MStarError.__new__(cls)
    MStarError.__init__(exc, message, param=param)
    if isinstance(exc, (RateLimitError, DrainingError)):
        exc.retry_after = retry_after
    exc.status_code = status
    if code:
        exc.code = code
    return exc
