"""The exception hierarchy maps cleanly to HTTP statuses and back."""

from __future__ import annotations

import pytest

from mstar import errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, errors.InvalidRequestError),
        (401, errors.AuthenticationError),
        (404, errors.NotFoundError),
        (409, errors.ConflictError),
        (413, errors.PayloadTooLargeError),
        (429, errors.RateLimitError),
        (500, errors.ModelError),
        (503, errors.NotReadyError),
        (504, errors.RequestTimeoutError),
        (418, errors.RequestError),
        (502, errors.ServiceError),
    ],
)
def test_error_for_status_builds_the_matching_exception(status: int, cls: type) -> None:
    exc = errors.error_for_status(status, "server said no", code="why")
    assert isinstance(exc, cls) and isinstance(exc, errors.MStarError)
    assert exc.status_code == status and exc.code == "why" and str(exc) == "server said no"


def test_rate_limit_error_carries_retry_after() -> None:
    exc = errors.error_for_status(429, "busy", retry_after=2.5)
    assert isinstance(exc, errors.RateLimitError) and exc.retry_after == 2.5


def test_messages_name_the_valid_choices() -> None:
    assert "valid voices: tara, zoe" in str(errors.UnknownVoiceError("bob", ["tara", "zoe"]))
    exc = errors.UnknownParameterError(["b", "a"], ["x", "y"])
    assert str(exc) == "unknown parameter(s) 'a', 'b'; accepted: x, y" and exc.param == "a"
    assert "available models: a, b" in str(errors.UnknownModelError("c", ["b", "a"]))


def test_request_errors_are_4xx_and_service_errors_are_retryable_statuses() -> None:
    for cls in (errors.UnknownVoiceError, errors.MediaError, errors.ShapeError, errors.EmptyInputError):
        assert 400 <= cls.status_code < 500 and issubclass(cls, errors.RequestError)
    for cls in (errors.RateLimitError, errors.NotReadyError):
        assert cls.status_code in (429, 503) and issubclass(cls, errors.ServiceError)
