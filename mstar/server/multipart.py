"""The one form parser: multipart (and urlencoded) bodies as text fields and uploaded files.

``/generate``, ``/v1/images/edits`` and ``/cancel`` all read forms through
:func:`read_form`: a body the framework cannot parse is a 400 naming the
problem, a text field given twice is refused, and every upload is read into
memory and its spooled file closed, whatever happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import HTTPException

from mstar.errors import InvalidRequestError, MStarError

__all__ = ["FORM_TYPES", "Form", "Upload", "media_type", "read_form"]

#: The content types :func:`read_form` reads.
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


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
    try:
        raw = await request.form()
    except (MStarError, HTTPException):
        raise
    except Exception as exc:
        raise InvalidRequestError(f"the multipart form could not be parsed: {exc}") from None
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
