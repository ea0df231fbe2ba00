"""Chat ``messages``: the content-part forms every entry point accepts, and where their media go.

A message is ``{"role", "content"}``; ``content`` is a string or a list of parts:

- text: ``{"type": "text", "text": ...}`` (OpenAI Responses' ``"input_text"`` is read as ``"text"``);
- a placeholder ``{"type": "image" | "audio" | "video"}``: the next item of the request's
  ``images=`` / ``audio=`` / ``video=`` argument, in order;
- an OpenAI part carrying its media: ``{"type": "image_url", "image_url": {"url": ...}}``
  (``"image_url": "<url>"`` too), ``{"type": "input_image", "image_url": "<url>"}``,
  ``{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}``,
  ``{"type": "audio_url", "audio_url": {"url": ...}}``, ``{"type": "video_url", "video_url": {"url": ...}}``.

:func:`place_media` turns every OpenAI part into a placeholder and puts its media at that
position of the modality's list, so the model runners only ever see placeholders. The Engine
and the client decode ``data:`` URLs themselves (:func:`inline_media`); remote ``http(s)`` URLs
are fetched only by a server whose policy allows it, never in-process. Torch-free.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mstar.errors import InvalidParameterError, InvalidRequestError, MediaError
from mstar.media import MediaItem

__all__ = ["MEDIA_PART_TYPES", "MESSAGE_ROLES", "PLACEHOLDER_TYPES", "TEXT_PART_TYPES", "MediaRef", "check_content", "inline_media", "media_ref",
           "place_media"]

#: OpenAI part type -> the modality of the media it carries.
MEDIA_PART_TYPES: dict[str, str] = {
    "image_url": "image",
    "input_image": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "video_url": "video",
}
#: Parts that refer, in order, to the request's own media arguments.
PLACEHOLDER_TYPES = ("image", "audio", "video")
TEXT_PART_TYPES = ("text", "input_text")
#: The roles a message may have, written exactly so (the OpenAI routes map "developer" onto "system").
MESSAGE_ROLES = ("system", "user", "assistant")

_ALL_TYPES = (*TEXT_PART_TYPES, *PLACEHOLDER_TYPES, *MEDIA_PART_TYPES)
_FORMAT = re.compile(r"[A-Za-z0-9]{1,8}")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MediaRef:
    """One OpenAI media part, parsed: a URL (``data:`` or ``http(s)``), or base64 ``data`` with its ``format``."""

    modality: str
    where: str  # "messages[0].content[1]", for error messages
    url: str | None = None
    data: str | None = None
    format: str | None = None

    @property
    def remote(self) -> bool:
        return self.url is not None and self.url[:8].lower().startswith(("http://", "https://"))


# The keys each OpenAI media part's object may hold (a null value counts as absent), and image detail levels.
_PART_KEYS = {"image_url": ("url", "detail"), "video_url": ("url",), "audio_url": ("url",), "input_audio": ("data", "format")}
_DETAILS = ("auto", "low", "high")


def _check_part_keys(part: dict[str, Any], ptype: str, where: str) -> None:
    """Refuse keys a media part does not have, naming them: a typo never drops what the client meant."""
    allowed = {"type", ptype} | ({"image_url", "detail"} if ptype == "input_image" else set())
    extra = sorted(str(k) for k, v in part.items() if k not in allowed and v is not None)
    if extra:
        raise InvalidParameterError(f"{where} has unknown key(s) {', '.join(map(repr, extra))}"[:300], param=f"{where}.{extra[0]}")
    body = part.get(ptype)
    keys = _PART_KEYS.get(ptype)
    if not isinstance(body, dict) or keys is None:
        return
    unknown = sorted(str(k) for k, v in body.items() if k not in keys and v is not None)
    if unknown:
        raise InvalidParameterError(
            f"{where}.{ptype} has unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(keys)}"[:300],
            param=f"{where}.{ptype}.{unknown[0]}",
        )
    detail = body.get("detail")
    if detail is not None and detail not in _DETAILS:
        raise InvalidParameterError(f"{where}.{ptype}.detail must be auto, low or high; got {detail!r}"[:200],
                                    param=f"{where}.{ptype}.detail")


def media_ref(part: dict[str, Any], ptype: str, where: str) -> MediaRef:
    """The media an OpenAI part of type ``ptype`` (a key of :data:`MEDIA_PART_TYPES`) carries, checked.

    ``where`` ("messages[0].content[1]") names the part in errors. Unknown keys, an empty or
    malformed ``input_audio.format`` and a ``detail`` other than auto/low/high are refused.
    """
    _check_part_keys(part, ptype, where)
    modality = MEDIA_PART_TYPES[ptype]
    body = part.get(ptype)
    if ptype == "input_image" and body is None:  # the Responses API puts the URL beside the type
        body = part.get("image_url")
    if ptype == "input_audio":
        if not isinstance(body, dict) or not isinstance(body.get("data"), str) or not body["data"]:
            raise MediaError(f'{where}.input_audio must be {{"data": "<base64>", "format": "wav"}}', param="messages")
        fmt = body.get("format")
        if fmt is not None and (not isinstance(fmt, str) or not _FORMAT.fullmatch(fmt)):
            raise MediaError(f"{where}.input_audio.format must be a short name such as 'wav' or 'mp3', got {fmt!r}",
                             param="messages")
        return MediaRef(modality, where, data=body["data"], format=fmt.lower() if fmt else None)
    url = body.get("url") if isinstance(body, dict) else body
    if not isinstance(url, str) or not url:
        raise MediaError(f'{where} must carry its URL as "{ptype}": {{"url": "data:..."}}', param="messages")
    return MediaRef(modality, where, url=url)


def place_media(
    messages: list[Any] | None,
    given: Mapping[str, Sequence[T]],
    resolve: Callable[[MediaRef], T | None],
) -> tuple[list[Any] | None, dict[str, list[T]]]:
    """Messages with every OpenAI media part made a placeholder, and each modality's media in order.

    ``given`` holds the request's own media per modality (what the placeholders refer to);
    ``resolve`` turns an OpenAI part's media into an item of the same kind, or returns None to
    keep that part as it is (the client leaves remote URLs to the server). The returned lists
    hold the media of the placeholders in the order they appear, then the given items no
    placeholder referred to (the models place those themselves). ``input_text`` parts become
    ``text`` parts. A message that is not an object or whose role is not one of
    :data:`MESSAGE_ROLES`, and a placeholder beyond the given items, raise
    :class:`InvalidRequestError`; a part of an unknown type raises :class:`MediaError` listing the
    accepted ones; text parts are passed through, and the rest (which roles and parts a model
    takes) is left to the model to check.
    """
    queues = {m: list(given.get(m, ())) for m in PLACEHOLDER_TYPES}
    placed: dict[str, list[T]] = {m: [] for m in PLACEHOLDER_TYPES}
    if not messages:
        return messages, {m: placed[m] + queues[m] for m in PLACEHOLDER_TYPES}
    out: list[Any] = []
    for i, msg in enumerate(messages):
        _check_role(msg, i)
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts: list[Any] = []
        for j, part in enumerate(content):
            ptype = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            if isinstance(ptype, str) and ptype in PLACEHOLDER_TYPES:
                if not queues[ptype]:
                    count = len(given.get(ptype, ()))
                    raise InvalidRequestError(
                        f"{where} refers to {ptype} #{count + 1}, but only {count} {ptype} item(s) were given",
                        param="messages",
                    )
                placed[ptype].append(queues[ptype].pop(0))
                parts.append(part)
            elif isinstance(ptype, str) and ptype in MEDIA_PART_TYPES:
                ref = media_ref(part, ptype, where)
                item = resolve(ref)
                if item is None:
                    parts.append(part)
                else:
                    placed[ref.modality].append(item)
                    parts.append({"type": ref.modality})
            elif ptype == "input_text":  # the Responses API's name for a text part
                parts.append({**part, "type": "text"})
            elif ptype is None or ptype == "text":
                parts.append(part)
            else:
                raise MediaError(
                    f"{where} has unsupported type {ptype!r}; supported: {', '.join(_ALL_TYPES)}", param="messages"
                )
        out.append({**msg, "content": parts})
    return out, {m: placed[m] + queues[m] for m in PLACEHOLDER_TYPES}


def _check_role(msg: Any, i: int) -> None:
    if not isinstance(msg, dict):
        raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
    role = msg.get("role")
    if role not in MESSAGE_ROLES:
        shown = repr(role) if len(repr(role)) <= 40 else repr(role)[:37] + "..."
        raise InvalidRequestError(f"messages[{i}].role must be one of {', '.join(MESSAGE_ROLES)}; got {shown}", param="messages")
    check_content(msg.get("content"), i)


def check_content(content: Any, i: int) -> None:
    """Refuse an empty list of parts as message ``i``'s content (as OpenAI does: a list holds at least one)."""
    if isinstance(content, list) and not content:
        raise InvalidRequestError(f"messages[{i}].content is an empty list; give at least one part (or a string)", param="messages")


def _b64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what} is not valid base64", param="messages") from None
    if not data:
        raise MediaError(f"{what} is empty", param="messages")
    return data


def inline_media(ref: MediaRef) -> MediaItem:
    """The media of an OpenAI part decoded in this process: ``data:`` URLs and ``input_audio`` only.

    Remote URLs raise :class:`MediaError`: the Engine never fetches (a server fetches them
    only when started with ``--allow-remote-media``).
    """
    if ref.data is not None:
        name = f"{ref.modality}.{ref.format}" if ref.format else f"{ref.modality}.bin"
        return MediaItem(name, _b64(ref.data, f"{ref.where}.input_audio.data"), ref.modality)
    url = ref.url or ""
    if ref.remote:
        raise MediaError(
            f"{ref.where}: remote media URLs are not fetched in-process; pass the media as a path or bytes "
            f"({ref.modality}=...) or inline as a data: URL",
            param="messages",
        )
    header, sep, payload = url.partition(",")
    if not header.lower().startswith("data:") or not sep or not header.lower().endswith(";base64"):
        raise MediaError(f"{ref.where}: a media URL must look like data:<mime>;base64,<payload> (or be an "
                         f"http(s) URL for a server to fetch); got {url[:40]!r}", param="messages")
    mime = header[5:].split(";")[0].strip().lower()
    if mime and mime.split("/")[0] != ref.modality and mime != "application/octet-stream":
        raise MediaError(f"{ref.where} carries {ref.modality} media but its data URL says {mime!r}", param="messages")
    return MediaItem(f"{ref.modality}.bin", _b64(payload, f"{ref.where} data URL payload"), ref.modality)
