"""Request facts shared by the Engine, the server and the client (torch-free).

Each rule lives here once, so that a request refused by the client is refused
by the server and by an in-process Engine with the same words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mstar.errors import InvalidParameterError, InvalidRequestError

__all__ = ["REQUEST_ID_CHARS", "REQUEST_ID_MAX_LEN", "SEED_MAX", "TIMEOUT_MAX_S", "check_request_id", "check_seed",
           "check_timeout", "parse_modalities"]

#: The longest request id accepted anywhere (it travels in headers and URL paths).
REQUEST_ID_MAX_LEN = 128

#: The characters a request id may hold: RFC 3986's unreserved set. Each is safe unescaped in a
#: response header (no CR/LF, NUL, tab, space or non-ASCII) and in one URL path segment (no ``/``,
#: ``%``, ``?`` or ``#``), so the id a client sent is the id ``/cancel/{id}`` finds.
REQUEST_ID_CHARS = "A-Z a-z 0-9 . _ ~ -"

_REQUEST_ID = re.compile(r"[A-Za-z0-9._~-]+")

#: The largest seed accepted: seeds are 63-bit, so every one fits a signed 64-bit integer.
SEED_MAX = 2**63 - 1
# A seed written as text: ASCII digits only ("１２８", "٣", "1_000" and " 5" are what int() also reads).
_SEED_TEXT = re.compile(r"[0-9]{1,19}")


def check_request_id(value: object) -> str:
    """Return ``value`` if it is a usable request id, else raise a typed error naming the rule.

    The rule, the same for the Engine, ``/generate``, ``/cancel`` and the client: 1 to
    :data:`REQUEST_ID_MAX_LEN` characters of :data:`REQUEST_ID_CHARS`, and not ``.`` or ``..``
    (which URL clients rewrite as path steps).
    """
    if not isinstance(value, str):
        raise InvalidRequestError(f"request_id must be a string, got {type(value).__name__}", param="request_id")
    if not value:
        raise InvalidRequestError("request_id must not be empty", param="request_id")
    if len(value) > REQUEST_ID_MAX_LEN:
        raise InvalidRequestError(
            f"request_id is {len(value)} characters long; at most {REQUEST_ID_MAX_LEN} are accepted", param="request_id"
        )
    if _REQUEST_ID.fullmatch(value) is None:
        bad = next(c for c in value if _REQUEST_ID.fullmatch(c) is None)
        raise InvalidRequestError(
            f"request_id {value!r} holds {bad!r}; use only the characters {REQUEST_ID_CHARS}", param="request_id"
        )
    if value in (".", ".."):
        raise InvalidRequestError(f"request_id {value!r} is not usable: it reads as a URL path step", param="request_id")
    return value


def check_seed(value: object) -> int:
    """``value`` as a seed in ``0 .. SEED_MAX``: an integer, or ASCII digits as text; else a typed error."""
    if isinstance(value, str) and _SEED_TEXT.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise InvalidParameterError(f"seed must be an integer from 0 to 2**63-1, got {shown}", param="seed")
    if not 0 <= value <= SEED_MAX:
        shown = str(value) if value.bit_length() <= 128 else "an integer of more than 38 digits"
        raise InvalidParameterError(f"seed must be from 0 to 2**63-1, got {shown}", param="seed")
    return value


#: The longest per-request deadline accepted, in seconds (a day).
TIMEOUT_MAX_S = 86400


def check_timeout(value: object) -> float:
    """``value`` as a deadline in seconds, in ``(0, TIMEOUT_MAX_S]``; else a typed error naming the range."""
    # Compared before float(): an integer of 400 digits is out of range, not an OverflowError.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= TIMEOUT_MAX_S:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise InvalidParameterError(f"timeout must be a number of seconds in (0, {TIMEOUT_MAX_S}], got {shown}", param="timeout")
    return float(value)


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
