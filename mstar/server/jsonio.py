"""JSON request bodies: reading the body with typed errors, and decoding a JSON object.

Every route that takes JSON (the OpenAI routes, ``/generate`` and ``/cancel``
sent as ``application/json``) reads it through :func:`read_json`, so an empty,
malformed, non-object, too deeply nested or lone-surrogate body gets the same
400 everywhere.
"""

from __future__ import annotations

import json
import re
from typing import Any

from litestar import Request
from litestar.exceptions import HTTPException

from mstar.errors import InvalidRequestError, MStarError

__all__ = ["parse_json_object", "read_body", "read_json"]

# A \uD800-\uDFFF escape: the only way a JSON body can carry a lone surrogate (not valid Unicode text).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def read_body(request: Request[Any, Any, Any]) -> bytes:
    """The whole request body; a failure to read it is a 400 (413 and 408 keep their own status)."""
    try:
        return await request.body()
    except (HTTPException, MStarError):
        raise  # e.g. 413 for a body over the limit, 408 for a body too slow: mapped by the error handlers
    except Exception as exc:
        raise InvalidRequestError(f"could not read the request body: {exc}") from exc


async def read_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The request body decoded as a JSON object."""
    return parse_json_object(await read_body(request))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a JSON request body that must be an object."""
    if not raw.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("the request body is not valid JSON: it is nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(doc).__name__}")
    if _SURROGATE_ESCAPE.search(raw) is not None:
        _check_unicode(doc)
    return doc


def _check_unicode(value: Any) -> None:
    """Refuse strings holding lone UTF-16 surrogates: they cannot be encoded, so tokenizers would fail on them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair); "
                    "text must be valid Unicode"
                ) from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
