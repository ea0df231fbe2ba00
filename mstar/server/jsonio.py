"""JSON request bodies and JSON-valued form fields: one strict decoder with typed errors.

Every route that takes JSON (the OpenAI routes, ``/generate`` and ``/cancel``
sent as ``application/json``) reads it through :func:`read_json`, and every
form field holding JSON (``model_kwargs``, ``messages``, the JSON-looking
fields of an image-edit form) goes through :func:`loads_strict`, so an empty,
malformed, non-object, too deeply nested, NaN-holding or lone-surrogate value
gets the same 400 everywhere, naming the field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from litestar import Request
from litestar.exceptions import HTTPException

from mstar.errors import InvalidParameterError, InvalidRequestError, MStarError

__all__ = ["MAX_JSON_DEPTH", "loads_strict", "parse_json_object", "read_body", "read_json"]

#: The deepest nesting of arrays and objects accepted in any JSON value. A chat message with a media
#: part is 5 levels deep; deeper input is refused before code that walks it recursively sees it.
MAX_JSON_DEPTH = 32

# A \uD800-\uDFFF escape: the only way a JSON body can carry a lone surrogate (not valid Unicode text).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def read_body(request: Request[Any, Any, Any]) -> bytes:
    """The whole request body; a failure to read it is a 400 (413 and 408 keep their own status)."""
    try:
        return await request.body()
    except (HTTPException, MStarError):
        raise  # e.g. 413 for a body over the limit, 408 for a body too slow: mapped by the error handlers
    except Exception as exc:
        raise InvalidRequestError(f"could not read the request body: {type(exc).__name__}") from exc


async def read_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The request body decoded as a JSON object."""
    return parse_json_object(await read_body(request))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a JSON request body that must be an object."""
    if not raw.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object")
    doc = loads_strict(raw, "the request body")
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {_json_type(doc)}")
    return doc


def loads_strict(raw: str | bytes, what: str, param: str | None = None) -> Any:
    """Decode one JSON value strictly; ``what`` names it in errors ("the request body", "model_kwargs").

    Refused with a 400: text that is not JSON or not UTF-8 (RFC 8259; Python's decoder would also
    take UTF-16 and UTF-32), ``NaN``/``Infinity`` (not JSON numbers, though Python's decoder takes
    them), an object naming a key twice (which one was meant?), nesting deeper than
    :data:`MAX_JSON_DEPTH`, and lone surrogates. A leading UTF-8 byte-order mark is ignored.
    """
    # A field's value is a wrong parameter (400 invalid_parameter); a whole body is a bad request.
    bad = InvalidParameterError if param is not None else InvalidRequestError
    try:
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8") if isinstance(raw, bytes) else raw
        doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise bad(f"{what} is not valid UTF-8 text", param=param) from None
    except _DuplicateKeyError as exc:
        raise bad(f"{what} names the key {exc.key!r} twice in one object; send each key once", param=param) from None
    except _ConstantError as exc:
        raise bad(
            f"{what} is not valid JSON: {exc.name} is not a finite JSON number", param=param
        ) from None
    except ValueError as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else (
            "it holds an integer with too many digits" if "digits" in str(exc) else "malformed")
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise bad(f"{what} is not valid JSON: {msg}{where}", param=param) from None
    except RecursionError:
        raise bad(
            f"{what} is nested too deeply: at most {MAX_JSON_DEPTH} levels of arrays and objects", param=param
        ) from None
    _check_depth(doc, what, param, bad)
    raw_bytes = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if _SURROGATE_ESCAPE.search(raw_bytes) is not None:
        _check_unicode(doc, what, param, bad)
    return doc


class _ConstantError(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key if len(key) <= 40 else key[:37] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return doc


def _refuse_constant(name: str) -> Any:
    raise _ConstantError(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 reads as infinity
        raise _ConstantError(text if len(text) <= 40 else text[:37] + "...")
    return value


def _json_type(value: Any) -> str:
    names: dict[type, str] = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_depth(doc: Any, what: str, param: str | None, bad: type[InvalidRequestError]) -> None:
    # Iterative, so the check itself cannot overflow the stack.
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise bad(
                    f"{what} is nested too deeply: at most {MAX_JSON_DEPTH} levels of arrays and objects", param=param
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _check_unicode(value: Any, what: str, param: str | None, bad: type[InvalidRequestError]) -> None:
    """Refuse strings holding lone UTF-16 surrogates: they cannot be encoded, so tokenizers would fail on them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad(
                    f"{what} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair); "
                    "text must be valid Unicode",
                    param=param,
                ) from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
