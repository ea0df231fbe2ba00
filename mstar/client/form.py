"""Building the multipart form of ``POST /generate`` from Python arguments.

The server infers each upload's modality from its filename extension, so
every file must carry an extension of the right kind. Raw ``bytes`` (which
:func:`mstar.media.normalize_media` names ``image.bin`` and so on) get one
sniffed from their magic bytes, or the modality's default when the format is
not recognised; the server then decodes and validates the content itself.
"""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Sequence
from typing import Any

from mstar.errors import InvalidParameterError, InvalidRequestError, MediaError
from mstar.media import EXTENSIONS, MediaArg, MediaItem, modality_for_filename, normalize_media
from mstar.messages import MediaRef, inline_media, place_media
from mstar.protocol import parse_modalities
from mstar.sniff import sniff_extension

__all__ = ["FileField", "build_form", "encode_model_kwargs", "join_modalities", "name_upload"]

# (field name, (filename, bytes, content type)): the shape requests wants for ``files=``.
FileField = tuple[str, tuple[str, bytes, str]]


def name_upload(item: MediaItem) -> MediaItem:
    """Give ``item`` a filename whose extension tells the server its modality.

    Raises :class:`MediaError` when the filename's extension names another
    modality than the argument it was passed as (``images="clip.wav"``).
    """
    ext_modality = modality_for_filename(item.name)
    if ext_modality == item.modality:
        return item
    if ext_modality is not None:
        raise MediaError(
            f"{item.modality} input {item.name!r} has a {ext_modality} file extension; "
            f"{item.modality} files end in {', '.join(EXTENSIONS[item.modality])}",
            param=item.modality,
        )
    stem = os.path.splitext(os.path.basename(item.name))[0] or item.modality
    ext = sniff_extension(item.data, item.modality)
    if ext not in EXTENSIONS[item.modality]:
        # Not recognised, or another modality's format (WebM bytes passed as audio): keep the caller's
        # word with the modality's first extension (.png, .wav, .mp4); the server checks the content.
        ext = EXTENSIONS[item.modality][0]
    return MediaItem(stem + ext, item.data, item.modality)


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def join_modalities(value: Sequence[str] | str | None, name: str) -> str | None:
    """``("text", "audio")`` or ``"Text, audio"`` -> ``"text,audio"``; None stays None (see
    :func:`mstar.protocol.parse_modalities`, which the server and the Engine apply too)."""
    names = parse_modalities(value, name)
    return None if names is None else ",".join(names)


def _json_default(value: Any) -> Any:
    # numpy arrays and scalars (robot states, for example) become plain lists and numbers.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_model_kwargs(model_kwargs: dict[str, Any]) -> str | None:
    """The ``model_kwargs`` form field: a JSON object without the ``None`` values."""
    kept = {k: v for k, v in model_kwargs.items() if v is not None}
    if not kept:
        return None
    for key, value in kept.items():
        try:
            json.dumps(value, default=_json_default, allow_nan=False)
        except ValueError:  # JSON has no NaN or infinity (the server refuses the tokens): say which kwarg
            raise InvalidParameterError(
                f"model kwarg {key!r} holds NaN or an infinity, which cannot be sent as JSON", param=key
            ) from None
        except TypeError as exc:
            raise InvalidParameterError(f"model kwarg {key!r} cannot be sent as JSON: {exc}", param=key) from exc
    return json.dumps(kept, default=_json_default, allow_nan=False, separators=(",", ":"))


def build_form(
    *,
    text: str | None,
    images: MediaArg | list[MediaArg] | None,
    audio: MediaArg | list[MediaArg] | None,
    video: MediaArg | list[MediaArg] | None,
    output_modalities: Sequence[str] | str | None,
    input_modalities: Sequence[str] | str | None,
    stream: bool,
    request_id: str,
    model_kwargs: dict[str, Any],
    messages: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, str], list[FileField]]:
    """Return ``(data, files)`` for ``requests``' ``data=`` and ``files=`` arguments."""
    if text is not None and not isinstance(text, str):
        raise InvalidRequestError(f"text must be a string, got {type(text).__name__}", param="text")
    data: dict[str, str] = {"streaming": "true" if stream else "false", "request_id": request_id}
    if text is not None:
        data["text"] = text
    media = {m: normalize_media(arg, m) for m, arg in (("image", images), ("audio", audio), ("video", video))}
    if messages is not None:
        if not isinstance(messages, list):
            raise InvalidRequestError("messages must be a list of {role, content} objects", param="messages")
        # Inline media in OpenAI parts travel as uploads (no base64 in the form); remote URLs are the server's.
        placed, media = place_media(messages, media, _inline_unless_remote)
        data["messages"] = json.dumps(placed, default=_json_default)
    outs = join_modalities(output_modalities, "output_modalities")
    if outs is not None:
        data["output_modalities"] = outs
    ins = join_modalities(input_modalities, "input_modalities")
    if ins is not None:
        data["input_modalities"] = ins
    kwargs_json = encode_model_kwargs(model_kwargs)
    if kwargs_json is not None:
        data["model_kwargs"] = kwargs_json
    files: list[FileField] = []
    for modality in ("image", "audio", "video"):
        for item in media[modality]:
            named = name_upload(item)
            files.append(("files", (named.name, named.data, _content_type(named.name))))
    return data, files


def _inline_unless_remote(ref: MediaRef) -> MediaItem | None:
    return None if ref.remote else inline_media(ref)
