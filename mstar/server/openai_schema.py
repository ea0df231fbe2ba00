"""Parsing and checking OpenAI-shaped request bodies.

Each parser takes the decoded JSON object (or form fields) and returns a typed
request; a wrong type or value raises :class:`InvalidParameterError` naming
the field. Standard fields are listed in each request's ``FIELDS`` (``user``,
an end-user tag for abuse tracking, is accepted and has no effect); every
other top-level key is kept in ``extra`` (the SDK's ``extra_body``) for the
adapter to pass through as model_kwargs or refuse.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mstar.errors import InvalidParameterError, InvalidRequestError

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


def _str(body: dict[str, Any], key: str, *, required: bool = False, default: str | None = None) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise InvalidRequestError(f"'{key}' is required", param=key)
        return default
    if not isinstance(value, str):
        raise InvalidParameterError(f"'{key}' must be a string, got {type(value).__name__}", param=key)
    return value


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameterError(f"'{key}' must be a boolean, got {value!r}", param=key)
    return value


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(f"'{key}' must be a number, got {value!r}", param=key)
    if not lo <= value <= hi:
        raise InvalidParameterError(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return float(value)


def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"'{key}' must be an integer, got {value!r}", param=key)
    if not lo <= value <= hi:
        raise InvalidParameterError(f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return value


def _choice(value: str, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidParameterError(f"'{key}' must be one of {', '.join(choices)}; got {value!r}", param=key)
    return value


def _extra(body: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in fields and v is not None}


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = _number(body, key, lo, hi)
        if v is not None:
            out[key] = v
    seed = _int(body, "seed", 0, 2**63 - 1)
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
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise InvalidParameterError("'stream_options' must be an object", param="stream_options")
    include_usage = _bool(opts or {}, "include_usage", False)
    modalities_raw = body.get("modalities")
    if modalities_raw is None:
        modalities: tuple[str, ...] = ("text",)
    elif isinstance(modalities_raw, list) and modalities_raw and all(m in ("text", "audio") for m in modalities_raw):
        modalities = tuple(dict.fromkeys(modalities_raw))
    else:
        raise InvalidParameterError(f"'modalities' must be a list of 'text' and 'audio', got {modalities_raw!r}", param="modalities")
    audio = body.get("audio")
    voice, fmt = None, "wav"
    if audio is not None:
        if not isinstance(audio, dict):
            raise InvalidParameterError("'audio' must be an object {voice, format}", param="audio")
        voice = _str(audio, "voice")
        fmt = _choice(_str(audio, "format", default="wav") or "wav", "audio.format", CHAT_AUDIO_FORMATS)
    sampling = _sampling(body)
    max_tokens = _int(body, "max_completion_tokens", 1, 10_000_000)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, 10_000_000)
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    stream = _bool(body, "stream", False)
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
        response_format=_choice(_str(body, "response_format", default="mp3") or "mp3", "response_format", SPEECH_FORMATS),
        speed=1.0 if speed is None else speed,
        stream_format=_choice(_str(body, "stream_format", default="audio") or "audio", "stream_format", ("audio", "sse")),
        instructions=_str(body, "instructions"),
        sampling=_sampling(body),
        extra=_extra(body, SpeechRequest.FIELDS),
    )


def _size(value: Any) -> tuple[int, int] | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and "x" in value:
        w, _, h = value.partition("x")
        if w.isdigit() and h.isdigit() and 16 <= int(w) <= 4096 and 16 <= int(h) <= 4096:
            return int(w), int(h)
    raise InvalidParameterError(f"'size' must be 'auto' or 'WIDTHxHEIGHT' (16..4096 each), got {value!r}", param="size")


def _image_common(body: dict[str, Any]) -> dict[str, Any]:
    fmt = _str(body, "response_format", default="b64_json")
    if fmt != "b64_json":
        raise InvalidParameterError(
            f"'response_format' must be 'b64_json' (this server does not host image URLs), got {fmt!r}", param="response_format"
        )
    prompt = _str(body, "prompt", required=True) or ""
    n = _int(body, "n", 1, 10)
    return {"model": _str(body, "model", required=True) or "", "prompt": prompt, "n": n or 1, "size": _size(body.get("size")), "sampling": _sampling(body)}


def parse_image(body: dict[str, Any]) -> ImageRequest:
    return ImageRequest(**_image_common(body), extra=_extra(body, ImageRequest.FIELDS))


def _form_value(value: str) -> Any:
    """Form fields are strings: numbers, booleans, arrays and objects are read as JSON."""
    text = value.strip()
    if text[:1] in "[{" or text in ("true", "false", "null") or text.lstrip("-").replace(".", "", 1).isdigit():
        try:
            return json.loads(text)
        except ValueError:
            return value
    return value


def parse_edit_form(fields: dict[str, str], images: list[Path]) -> ImageEditRequest:
    """The text fields of an image-edit multipart form (files already saved)."""
    body: dict[str, Any] = {k: (_form_value(v) if k not in ("model", "prompt", "size", "response_format") else v) for k, v in fields.items()}
    if "mask" in body:
        raise InvalidParameterError("'mask' is not supported; describe the edit in the prompt", param="mask")
    if not images:
        raise InvalidRequestError("image edits need at least one 'image' file", param="image")
    return ImageEditRequest(**_image_common(body), extra=_extra(body, ImageEditRequest.FIELDS), images=images)
