"""The one form parser: multipart (and urlencoded) bodies as text fields and uploaded files.

``/generate``, ``/v1/images/edits`` and ``/cancel`` all read forms through
:func:`read_form`: a body the framework cannot parse is a 400 naming the
problem, a text field given twice is refused, and every upload is read into
memory and its spooled file closed, whatever happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException

from mstar.errors import InvalidRequestError, MStarError, PayloadTooLargeError

__all__ = ["FORM_TYPES", "MAX_FORM_PARTS", "Form", "Upload", "media_type", "read_form"]

#: The content types :func:`read_form` reads.
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

#: The framework's multipart limits (Litestar's part count, the ``multipart`` parser's header limits).
MAX_FORM_PARTS = 1000
MAX_PART_HEADERS = 8
MAX_PART_HEADER_BYTES = 4096 + 128

# The multipart parser's messages that are safe and clear to pass on, in our words.
_PARSER_WORDS = {
    "Unexpected end of multipart stream (parser closed)": "the body ends before the closing boundary",
    "Invalid line break after first boundary": "the first boundary is not followed by CRLF",
    "Unexpected byte after first boundary": "the first boundary is not followed by CRLF",
    "Unexpected bytes after boundary": "a boundary is followed by stray bytes",
    "Invalid line break in segment header": "a part header has a bare line break",
    "Segment header failed to decode": "a part header is not valid text",
    "Malformed segment header": "a part header is malformed",
    "Invalid segment header name": "a part header has an invalid name",
    "Multiple segment Content-Length headers": "a part has two Content-Length headers",
    "Invalid segment Content-Length header value": "a part's Content-Length is not a number",
    "Missing Content-Disposition segment header": "a part has no Content-Disposition header",
    "Invalid Content-Disposition segment header: Wrong type": "a part's Content-Disposition is not form-data",
    "Segment Content-Length exceeded": "a part is longer than its Content-Length",
    "Segment size does not match Content-Length header": "a part is shorter than its Content-Length",
    "Invalid characters in boundary": "the boundary of the Content-Type holds invalid characters",
    "Empty boundary": "the boundary of the Content-Type is empty",
}


@dataclass(frozen=True, slots=True)
class Upload:
    """One uploaded file: its form field name, the client's filename and the bytes."""

    field: str
    filename: str
    data: bytes


@dataclass(slots=True)
class Form:
    """A parsed form: single-valued text fields, and the uploads in the order they came."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[Upload] = field(default_factory=list)


def media_type(request: Request[Any, Any, Any]) -> str:
    """The request's content type without parameters, lower-cased (``"multipart/form-data"``)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_form(request: Request[Any, Any, Any]) -> Form:
    """Parse the request body as a form (the caller checks the content type first)."""
    if media_type(request) == "application/x-www-form-urlencoded":
        return _urlencoded(await request.body())
    try:
        raw = await request.form()
    except MStarError:
        raise
    except HTTPException as exc:
        if exc.status_code in (408, 413):  # the body was too slow or too large: keep the status
            raise
        raise _form_error(exc) from None
    except UnicodeDecodeError:
        # The framework decodes text parts itself; its decoder's own text names bytes, not fields.
        raise InvalidRequestError("a text field of the form is not valid UTF-8 (nor in its declared charset); "
                                  "send text fields as UTF-8, and binary data as file uploads") from None
    except LookupError:
        raise InvalidRequestError("a text field of the form declares a charset this server does not know; use UTF-8") from None
    except Exception:
        raise InvalidRequestError("the multipart form could not be parsed") from None
    form = Form()
    try:
        for key, value in raw.multi_items():
            if isinstance(value, UploadFile):
                form.files.append(Upload(key, value.filename or "", await value.read()))
            elif key in form.fields:
                raise InvalidRequestError(f"form field {key!r} was given more than once", param=key)
            else:
                form.fields[key] = value
    finally:
        for _, value in raw.multi_items():
            if isinstance(value, UploadFile):
                await value.close()
    return form


def _urlencoded(body: bytes) -> Form:
    """A urlencoded body, read strictly: the framework's parser replaces bad UTF-8 with U+FFFD unseen."""
    try:
        text = body.decode("ascii")  # percent-escapes carry every non-ASCII byte
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict", max_num_fields=MAX_FORM_PARTS)
    except UnicodeDecodeError:
        raise InvalidRequestError("a field of the urlencoded form is not valid UTF-8 once percent-decoded (or the body holds "
                                  "raw non-ASCII bytes); percent-encode UTF-8 text") from None
    except ValueError as exc:
        if "Max number of fields" in str(exc):
            raise PayloadTooLargeError(f"the form has more than {MAX_FORM_PARTS} fields; at most {MAX_FORM_PARTS} are accepted") from None
        raise InvalidRequestError("the urlencoded form could not be parsed") from None
    form = Form()
    for key, value in pairs:
        if key in form.fields:
            raise InvalidRequestError(f"form field {key!r} was given more than once", param=key)
        form.fields[key] = value
    return form


def _form_error(exc: HTTPException) -> MStarError:
    """Our words for the framework's multipart refusals (it says "Request Entity Too Large" with a 400)."""
    detail = str(exc.detail or "")
    origin = exc.__cause__ or exc.__context__
    cause = str(origin.args[0]) if origin is not None and origin.args else ""
    if detail == "Request Entity Too Large":
        if "segment count" in cause:
            return PayloadTooLargeError(f"the form has more than {MAX_FORM_PARTS} parts; at most {MAX_FORM_PARTS} are accepted")
        if "header length" in cause:
            return PayloadTooLargeError(f"a part header of the form is longer than the {MAX_PART_HEADER_BYTES}-byte limit")
        if "header count" in cause:
            return PayloadTooLargeError(f"a part of the form has more than {MAX_PART_HEADERS} headers; at most {MAX_PART_HEADERS} are accepted")
        return PayloadTooLargeError("the form is over one of this server's multipart limits "
                                    f"({MAX_FORM_PARTS} parts, {MAX_PART_HEADERS} headers of {MAX_PART_HEADER_BYTES} bytes per part)")
    if "boundary" in detail:
        return InvalidRequestError("the multipart Content-Type has no boundary; let your HTTP library set the header")
    if detail == "Invalid multipart/form-data":
        why = _PARSER_WORDS.get(cause, "it is not well-formed multipart/form-data")
        return InvalidRequestError(f"the multipart form could not be parsed: {why}")
    if detail.startswith("Unexpected eof"):
        return InvalidRequestError("the multipart form could not be parsed: it ends inside a part's headers")
    return InvalidRequestError("the multipart form could not be parsed")
