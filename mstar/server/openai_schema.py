"""Parsing and checking OpenAI-shaped request bodies.

Each parser takes the decoded JSON object (or form fields) and returns a typed
request; a wrong type or value raises :class:`InvalidParameterError` naming
the field. Standard fields are listed in each request's ``FIELDS`` (``user``,
an end-user tag for abuse tracking, is accepted and has no effect); every
other top-level key is kept in ``extra`` (the SDK's ``extra_body``) for the
adapter to pass through as model_kwargs or refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mstar.errors import InvalidParameterError, InvalidRequestError
from mstar.protocol import SEED_MAX
from mstar.server import fields
from mstar.server.jsonio import loads_strict

__all__ = [
    "ChatRequest",
    "ImageEditRequest",
    "ImageRequest",
    "OpenAIRequest",
    "SpeechRequest",
    "parse_chat",
    "parse_edit_form",
    "parse_image",
    "parse_speech",
]

CHAT_AUDIO_FORMATS = ("wav", "mp3", "flac", "opus", "aac", "pcm16")
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


@dataclass(slots=True)
class OpenAIRequest:
    FIELDS: ClassVar[tuple[str, ...]] = ()
    model: str
    sampling: dict[str, Any] = field(default_factory=dict)  # the standard sampling fields that were given
    extra: dict[str, Any] = field(default_factory=dict)  # non-standard keys: model_kwargs candidates


@dataclass(slots=True)
class ChatRequest(OpenAIRequest):
    FIELDS: ClassVar[tuple[str, ...]] = (
        "model", "messages", "stream", "stream_options", "modalities", "audio", "temperature", "top_p",
        "max_tokens", "max_completion_tokens", "seed", "n", "user",
    )
    messages: list[dict[str, Any]] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    modalities: tuple[str, ...] = ("text",)
    audio_voice: str | None = None
    audio_format: str = "wav"


@dataclass(slots=True)
class SpeechRequest(OpenAIRequest):
    FIELDS: ClassVar[tuple[str, ...]] = (
        "model", "input", "voice", "response_format", "speed", "stream_format", "instructions", "temperature", "top_p", "seed", "user",
    )
    input: str = ""
    voice: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str | None = None


@dataclass(slots=True)
class ImageRequest(OpenAIRequest):
    FIELDS: ClassVar[tuple[str, ...]] = ("model", "prompt", "n", "size", "response_format", "seed", "user")
    prompt: str = ""
    n: int = 1
    size: tuple[int, int] | None = None


@dataclass(slots=True)
class ImageEditRequest(ImageRequest):
    FIELDS: ClassVar[tuple[str, ...]] = ("model", "prompt", "image", "image[]", "n", "size", "response_format", "seed", "user")
    images: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- field helpers

_str = fields.string
_bool = fields.boolean
_number = fields.number
_int = fields.integer

#: The longest ``user`` tag accepted: an end-user id or its hash, never a payload.
USER_MAX_CHARS = 256


def _extra(body: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in names and v is not None}


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """The standard sampling fields that were given; checks ``user`` too, which every route accepts and ignores."""
    _str(body, "user", max_chars=USER_MAX_CHARS)
    out: dict[str, Any] = {}
    for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = _number(body, key, lo, hi)
        if v is not None:
            out[key] = v
    seed = _int(body, "seed", 0, SEED_MAX)
    if seed is not None:
        out["seed"] = seed
    return out


# --------------------------------------------------------------------------- requests


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    model = _str(body, "model", required=True) or ""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    if _int(body, "n", 1, 1) not in (None, 1):
        raise InvalidParameterError("'n' must be 1", param="n")
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise InvalidParameterError("'stream_options' must be an object", param="stream_options")
        if not stream:  # as OpenAI answers: the options of a stream that was not asked for
            raise InvalidParameterError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        fields.refuse_unknown(opts, ("include_usage",), "'stream_options'")
    include_usage = _bool(opts or {}, "include_usage", False, param="stream_options.include_usage")
    modalities_raw = body.get("modalities")
    if modalities_raw is None:
        modalities: tuple[str, ...] = ("text",)
    elif isinstance(modalities_raw, list) and modalities_raw and all(m in ("text", "audio") for m in modalities_raw):
        modalities = tuple(dict.fromkeys(modalities_raw))
    else:
        raise InvalidParameterError(f"'modalities' must be a list of 'text' and 'audio', got {modalities_raw!r}"[:200], param="modalities")
    audio = body.get("audio")
    voice, fmt = None, "wav"
    if audio is not None:
        if not isinstance(audio, dict):
            raise InvalidParameterError("'audio' must be an object {voice, format}", param="audio")
        fields.refuse_unknown(audio, ("voice", "format"), "'audio'")
        voice = _str(audio, "voice", param="audio.voice")
        fmt = fields.choice(audio, "format", CHAT_AUDIO_FORMATS, "wav", param="audio.format")
    sampling = _sampling(body)
    # Both spellings are checked: a bad value is refused even when the other one is fine.
    new = _int(body, "max_completion_tokens", 1, 10_000_000)
    old = _int(body, "max_tokens", 1, 10_000_000)
    if new is not None and old is not None and new != old:
        raise InvalidParameterError(
            f"'max_tokens' ({old}) and 'max_completion_tokens' ({new}) disagree; send one of them", param="max_tokens"
        )
    max_tokens = new if new is not None else old
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    if "audio" in modalities and stream and fmt != "pcm16":
        raise InvalidParameterError("streamed chat audio is sent as pcm16 chunks; set audio.format to 'pcm16'", param="audio.format")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        modalities=modalities,
        audio_voice=voice,
        audio_format=fmt,
        sampling=sampling,
        extra=_extra(body, ChatRequest.FIELDS),
    )


def parse_speech(body: dict[str, Any]) -> SpeechRequest:
    model = _str(body, "model", required=True) or ""
    text = _str(body, "input", required=True) or ""
    if len(text) > 10_000:
        raise InvalidParameterError("'input' is longer than 10000 characters", param="input")
    speed = _number(body, "speed", 0.25, 4.0)
    return SpeechRequest(
        model=model,
        input=text,
        voice=_str(body, "voice"),
        response_format=fields.choice(body, "response_format", SPEECH_FORMATS, "mp3"),
        speed=1.0 if speed is None else speed,
        stream_format=fields.choice(body, "stream_format", ("audio", "sse"), "audio"),
        instructions=_str(body, "instructions"),
        sampling=_sampling(body),
        extra=_extra(body, SpeechRequest.FIELDS),
    )


_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def _size(value: Any) -> tuple[int, int] | None:
    if value is None or value == "auto":
        return None
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is not None and 16 <= int(m.group(1)) <= 4096 and 16 <= int(m.group(2)) <= 4096:
        return int(m.group(1)), int(m.group(2))
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise InvalidParameterError(f"'size' must be 'auto' or 'WIDTHxHEIGHT' (16..4096 each), got {shown}", param="size")


def _image_common(body: dict[str, Any]) -> dict[str, Any]:
    fmt = _str(body, "response_format", default="b64_json")
    if fmt != "b64_json":
        raise InvalidParameterError(
            f"'response_format' must be 'b64_json' (this server does not host image URLs), got {fmt!r}"[:200], param="response_format"
        )
    prompt = _str(body, "prompt", required=True) or ""
    n = _int(body, "n", 1, 10) or 1
    sampling = _sampling(body)
    seed = sampling.get("seed")
    if seed is not None and seed + n - 1 > SEED_MAX:
        # Image i runs with seed + i: every one of them must be a seed the client may send.
        raise InvalidParameterError(f"'seed' + 'n' - 1 must be at most 2**63-1 (image i uses seed + i); got seed {seed} with n {n}",
                                    param="seed")
    return {"model": _str(body, "model", required=True) or "", "prompt": prompt, "n": n, "size": _size(body.get("size")), "sampling": sampling}


def parse_image(body: dict[str, Any]) -> ImageRequest:
    return ImageRequest(**_image_common(body), extra=_extra(body, ImageRequest.FIELDS))


# Form fields that hold plain text, never JSON; the others are read as JSON when they look like it.
_TEXT_FORM_FIELDS = ("model", "prompt", "size", "response_format", "user")
_FORM_INT = re.compile(r"-?[0-9]+")
_FORM_FLOAT = re.compile(r"-?[0-9]+\.[0-9]+(?:[eE][-+]?[0-9]+)?|-?[0-9]+[eE][-+]?[0-9]+")


def _form_value(key: str, value: str) -> Any:
    """A form field is text: arrays, objects, numbers and booleans written as (strict) JSON are read as such.

    Numbers must be ASCII (``"²"`` stays text, and is then refused where a number is needed), and
    are not trimmed (``" 5"`` stays text too), so what a JSON body would refuse is refused from a
    form too.
    """
    text = value
    if text[:1] in ("[", "{") or text in ("true", "false", "null"):
        return loads_strict(text, f"form field {key!r}", param=key)
    if _FORM_INT.fullmatch(text):
        return fields.parse_int_text(text, key)
    if _FORM_FLOAT.fullmatch(text):
        return fields.parse_number_text(text, key)
    return value


def parse_edit_form(form_fields: dict[str, str], images: list[Path]) -> ImageEditRequest:
    """The text fields of an image-edit multipart form (files already saved)."""
    body: dict[str, Any] = {k: (v if k in _TEXT_FORM_FIELDS else _form_value(k, v)) for k, v in form_fields.items()}
    if "mask" in body:
        raise InvalidParameterError("'mask' is not supported; describe the edit in the prompt", param="mask")
    for name in ("image", "image[]"):
        if name in body:
            raise InvalidParameterError(f"'{name}' must be an uploaded file (with a filename), not a text field", param=name)
    if not images:
        raise InvalidRequestError("image edits need at least one 'image' file", param="image")
    return ImageEditRequest(**_image_common(body), extra=_extra(body, ImageEditRequest.FIELDS), images=images)
