"""Strict field checks shared by every route: JSON bodies and form fields alike.

One rule per kind of value, so ``/generate``, ``/cancel`` and the OpenAI routes
refuse the same bad value with the same words:

* numbers are numbers: ``true`` is not 1, ``NaN`` and infinities are refused,
  and a number written as text (form fields) must be plain ASCII digits that
  ``int()``/``float()`` read back exactly (no ``"²"``, ``"1_000"``, ``" 5"``,
  no 5,000-digit integers);
* enums are exact: an empty string is a wrong value, not "use the default";
* unknown fields are refused, naming them and the accepted ones.

Each check raises :class:`~mstar.errors.InvalidParameterError` (or
:class:`~mstar.errors.InvalidRequestError` for a missing field) with ``param``
set to the client's field name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from mstar.errors import InvalidParameterError, InvalidRequestError

__all__ = [
    "MAX_NUMBER_CHARS",
    "boolean",
    "choice",
    "form_bool",
    "integer",
    "json_kind",
    "number",
    "parse_int_text",
    "parse_number_text",
    "refuse_query",
    "refuse_unknown",
    "string",
]

#: The longest number accepted as text; longer digit strings are refused before ``int()`` sees them.
MAX_NUMBER_CHARS = 40

_INT_TEXT = re.compile(r"-?[0-9]+")
_FLOAT_TEXT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def string(body: Mapping[str, Any], key: str, *, required: bool = False, default: str | None = None,
           max_chars: int | None = None, param: str | None = None) -> str | None:
    """``body[key]`` as a string (``default`` when absent or null)."""
    name = param or key
    value = body.get(key)
    if value is None:
        if required:
            raise InvalidRequestError(f"'{name}' is required", param=name)
        return default
    if not isinstance(value, str):
        raise InvalidParameterError(f"'{name}' must be a string, got {_kind(value)}", param=name)
    if max_chars is not None and len(value) > max_chars:
        raise InvalidParameterError(f"'{name}' is {len(value)} characters long; at most {max_chars} are accepted", param=name)
    return value


def boolean(body: Mapping[str, Any], key: str, default: bool, *, param: str | None = None) -> bool:
    """``body[key]`` as a JSON boolean (not 0/1, not "true")."""
    name = param or key
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameterError(f"'{name}' must be true or false, got {_shown(value)}", param=name)
    return value


def number(body: Mapping[str, Any], key: str, lo: float, hi: float, *, param: str | None = None) -> float | None:
    """``body[key]`` as a finite number in ``[lo, hi]`` (None when absent)."""
    name = param or key
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"'{name}' must be a number, got {_kind(value)}", param=name)
    if isinstance(value, int) and abs(value) > 10**MAX_NUMBER_CHARS:
        raise InvalidParameterError(f"'{name}' must be between {lo} and {hi}; got a {len(str(abs(value)))}-digit number", param=name)
    if not math.isfinite(value):
        raise InvalidParameterError(f"'{name}' must be a finite number, got {value}", param=name)
    if not lo <= value <= hi:
        raise InvalidParameterError(f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return float(value)


def integer(body: Mapping[str, Any], key: str, lo: int, hi: int, *, param: str | None = None) -> int | None:
    """``body[key]`` as an integer in ``[lo, hi]`` (None when absent). ``2.0`` is not an integer."""
    name = param or key
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"'{name}' must be an integer, got {_kind(value)}", param=name)
    if not lo <= value <= hi:
        shown = value if abs(value) < 10**MAX_NUMBER_CHARS else f"a {len(str(abs(value)))}-digit number"
        raise InvalidParameterError(f"'{name}' must be between {lo} and {hi}, got {shown}", param=name)
    return value


def choice(body: Mapping[str, Any], key: str, choices: Iterable[str], default: str, *, param: str | None = None) -> str:
    """``body[key]``, which must be one of ``choices`` exactly; absent or null gives ``default``."""
    name = param or key
    options = tuple(choices)
    value = string(body, key, default=default, param=name)
    if value not in options:
        raise InvalidParameterError(f"'{name}' must be one of {', '.join(options)}; got {_shown(value)}", param=name)
    return value


def refuse_unknown(given: Iterable[str], accepted: Iterable[str], where: str, *, hint: str = "") -> None:
    """Refuse keys of ``given`` not in ``accepted``, naming them and the accepted ones."""
    allowed = tuple(accepted)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise InvalidParameterError(
            f"unknown field(s) {', '.join(map(_shown, unknown))} in {where}; accepted: {', '.join(allowed)}{hint}",
            param=unknown[0],
        )


def refuse_query(params: Iterable[str], route: str) -> None:
    """Refuse a query string on a route that reads none: ``/generate?request_id=x`` must not look honoured."""
    given = sorted(set(params))
    if given:
        raise InvalidParameterError(
            f"{route} takes no query parameters; got {', '.join(map(_shown, given))} (send every field in the body)"[:300],
            param=given[0],
        )


def form_bool(value: str, name: str) -> bool:
    """A form field's text as a boolean (true/false, 1/0, yes/no, on/off)."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidParameterError(f"{name} must be true or false, got {_shown(value)}", param=name)


def parse_int_text(text: str, name: str) -> int:
    """An integer written as text: optional ``-`` and ASCII digits only, at most :data:`MAX_NUMBER_CHARS`."""
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidParameterError(f"{name} is a number of {len(text)} characters; at most {MAX_NUMBER_CHARS} are accepted", param=name)
    if _INT_TEXT.fullmatch(text) is None:
        raise InvalidParameterError(f"{name} must be an integer written in ASCII digits, got {_shown(text)}", param=name)
    return int(text)


def parse_number_text(text: str, name: str) -> float:
    """A finite decimal number written as text (ASCII, no ``nan``/``inf``/underscores), at most :data:`MAX_NUMBER_CHARS`."""
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidParameterError(f"{name} is a number of {len(text)} characters; at most {MAX_NUMBER_CHARS} are accepted", param=name)
    if _FLOAT_TEXT.fullmatch(text) is None:
        raise InvalidParameterError(f"{name} must be a decimal number, got {_shown(text)}", param=name)
    value = float(text)
    if not math.isfinite(value):
        raise InvalidParameterError(f"{name} is out of range, got {_shown(text)}", param=name)
    return value


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, in words for an error ("an array", "the number 5", "null")."""
    return _kind(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, int):
        return f"the number {value}" if abs(value) < 10**MAX_NUMBER_CHARS else f"a {len(str(abs(value)))}-digit number"
    names: dict[type, str] = {dict: "an object", list: "an array", str: "a string"}
    return names.get(type(value), type(value).__name__)
