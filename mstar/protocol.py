"""Request facts shared by the Engine, the server and the client (torch-free).

Each rule lives here once, so that a request refused by the client is refused
by the server and by an in-process Engine with the same words.
"""

from __future__ import annotations

from collections.abc import Sequence

from mstar.errors import InvalidRequestError

__all__ = ["REQUEST_ID_MAX_LEN", "check_request_id", "parse_modalities"]

#: The longest request id accepted anywhere (it travels in headers and URL paths).
REQUEST_ID_MAX_LEN = 256


def check_request_id(value: object) -> str:
    """Return ``value`` if it is a usable request id, else raise a typed error naming the rule."""
    if not isinstance(value, str) or not value or len(value) > REQUEST_ID_MAX_LEN:
        raise InvalidRequestError(
            f"request_id must be a non-empty string of at most {REQUEST_ID_MAX_LEN} characters", param="request_id"
        )
    return value


def parse_modalities(value: Sequence[str] | str | None, name: str) -> tuple[str, ...] | None:
    """``"text, Audio"`` or ``["text", "audio"]`` -> ``("text", "audio")``; None stays None.

    Names are trimmed and lower-cased; empty entries are dropped, and a value
    that names nothing is refused.
    """
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in parts):
        raise InvalidRequestError(f"{name} must be modality names (strings), got {value!r}", param=name)
    cleaned = tuple(p.strip().lower() for p in parts if p.strip())
    if not cleaned:
        raise InvalidRequestError(f"{name} must name at least one modality", param=name)
    return cleaned
