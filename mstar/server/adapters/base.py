"""The base of per-model OpenAI adapters, and the parsed OpenAI requests they translate.

An adapter turns an OpenAI-shaped request into :class:`SubmitArgs` (the
arguments of ``Engine.generate``) and says which surfaces its model offers.
A surface the adapter does not implement answers 404. Standard OpenAI
sampling fields are mapped onto the model's own keys through
:attr:`OpenAIAdapter.sampling_keys`; a standard field the model cannot honour
is refused (400), never silently ignored. Non-standard knobs arrive as extra
top-level keys (the SDK's ``extra_body``) and pass through verbatim as
model_kwargs after a check against the model's accepted keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mstar.errors import (
    EmptyInputError,
    InvalidParameterError,
    InvalidRequestError,
    NotFoundError,
    UnknownParameterError,
    UnknownVoiceError,
)
from mstar.messages import check_content, media_ref
from mstar.registry import get_model_info
from mstar.server.openai_schema import ChatRequest, ImageEditRequest, ImageRequest, OpenAIRequest, SpeechRequest

if TYPE_CHECKING:
    from mstar.engine import Engine
    from mstar.server.media_io import UploadScope

__all__ = ["OpenAIAdapter", "SubmitArgs", "convert_messages", "flatten_text"]


# --------------------------------------------------------------------------- submit args


@dataclass(slots=True)
class SubmitArgs:
    """What an adapter hands to ``Engine.generate``."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    images: list[Path] = field(default_factory=list)
    audio: list[Path] = field(default_factory=list)
    video: list[Path] = field(default_factory=list)
    output_modalities: tuple[str, ...] = ("text",)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def add_media(self, modality: str, path: Path) -> None:
        """Append a saved file to the list of its modality (``"image"``, ``"audio"``, ``"video"``)."""
        {"image": self.images, "audio": self.audio, "video": self.video}[modality].append(path)

    def engine_kwargs(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "messages": self.messages,
            "images": [str(p) for p in self.images] or None,
            "audio": [str(p) for p in self.audio] or None,
            "video": [str(p) for p in self.video] or None,
            "output_modalities": self.output_modalities,
            **self.model_kwargs,
        }


# --------------------------------------------------------------------------- messages


_MEDIA_PARTS = {
    "image_url": "image",
    "input_image": "image",
    "audio_url": "audio",
    "input_audio": "audio",
    "video_url": "video",
}


def convert_messages(messages: list[dict[str, Any]], media: UploadScope) -> tuple[list[dict[str, Any]], SubmitArgs]:
    """OpenAI chat messages -> mstar messages (media parts become ``{"type": modality}``
    referring, in order, to the saved files in the returned args)."""
    args = SubmitArgs()
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        _check_message_keys(msg, i)
        role = msg.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise InvalidRequestError(
                f"messages[{i}].role must be system, developer, user or assistant; got {role!r}", param=f"messages[{i}].role"
            )
        content = msg.get("content")
        if content is None:
            out.append({"role": role, "content": ""})
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content")
        check_content(content, i)
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequestError(f"{where} must be an object with a 'type'", param=where)
            ptype = part["type"]
            _check_part_keys(part, ptype, where)
            if ptype in ("text", "input_text"):
                text = part.get("text")
                if not isinstance(text, str):
                    raise InvalidRequestError(f"{where}.text must be a string", param=where)
                parts.append({"type": "text", "text": text})
                continue
            modality = _MEDIA_PARTS.get(ptype)
            if modality is None:
                raise InvalidRequestError(
                    f"{where} has unsupported type {ptype!r}; supported: text, {', '.join(_MEDIA_PARTS)}", param=where
                )
            ref = media_ref(part, ptype, where)  # the rule /generate and the Engine read parts by
            if ref.data is not None:
                _, path = media.save_base64(ref.data, ref.format, expected=modality, name=where)
            else:
                _, path = media.resolve_ref(ref.url, expected=modality, name=where)
            args.add_media(modality, path)
            parts.append({"type": modality})
        out.append({"role": role, "content": parts})
    if not out:
        raise InvalidRequestError("messages must hold at least one message", param="messages")
    return out, args


# Keys an OpenAI message may carry that this server honours; a null value counts as absent, so a
# response message sent back as history (``refusal: null, tool_calls: null``) is accepted.
_MESSAGE_KEYS = ("role", "content")
_UNSUPPORTED_MESSAGE_KEYS = {
    "tool_calls": "tool calls are not supported by this server",
    "function_call": "function calls are not supported by this server",
    "tool_call_id": "tool results are not supported by this server",
    "name": "participant names are not supported; put who speaks in the content",
    "audio": "a reference to an earlier audio answer is not supported; send the transcript as content",
    "refusal": "refusals are not accepted as input",
}


def _check_message_keys(msg: dict[str, Any], i: int) -> None:
    for key, value in msg.items():
        if key in _MESSAGE_KEYS or value is None:
            continue
        why = _UNSUPPORTED_MESSAGE_KEYS.get(key, f"accepted keys: {', '.join(_MESSAGE_KEYS)}")
        raise InvalidParameterError(f"messages[{i}].{key} is not supported ({why})"[:300], param=f"messages[{i}].{key}")


def _check_part_keys(part: dict[str, Any], ptype: str, where: str) -> None:
    # Media parts' keys are checked with their media (mstar/messages.py:media_ref); unknown types by the caller.
    if ptype not in ("text", "input_text"):
        return
    extra = sorted(k for k, v in part.items() if k not in ("type", "text") and v is not None)
    if extra:
        raise InvalidParameterError(f"{where} has unknown key(s) {', '.join(map(repr, extra))}"[:300], param=f"{where}.{extra[0]}")


def flatten_text(messages: list[dict[str, Any]]) -> str:
    """The text of mstar messages joined by newlines (for models that take one prompt)."""
    texts: list[str] = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            if content:
                texts.append(content)
        else:
            texts.extend(p["text"] for p in content or [] if p.get("type") == "text" and p.get("text"))
    return "\n".join(texts)


# --------------------------------------------------------------------------- adapter


class OpenAIAdapter:
    """Base adapter: one subclass per model, registered in :mod:`mstar.server.adapters`.

    Override the ``*_to_request`` methods for the surfaces the model offers;
    the others answer 404.
    """

    #: OpenAI field -> this model's kwarg (only fields listed here are honoured).
    sampling_keys: ClassVar[dict[str, str]] = {}
    #: Voices of a model whose registry entry names none (plugins, test doubles); the registry's win.
    voices: ClassVar[tuple[str, ...]] = ()
    default_voice: ClassVar[str | None] = None
    #: chat audio output: which model kwarg takes the voice.
    voice_key: ClassVar[str] = "voice"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.info.name

    # ---- surfaces
    def surfaces(self) -> set[str]:
        """Which surfaces this adapter implements: chat, speech, images, image_edits."""
        names = {"chat": "chat_to_request", "speech": "speech_to_request", "images": "image_to_request", "image_edits": "edit_to_request"}
        return {s for s, meth in names.items() if getattr(type(self), meth) is not getattr(OpenAIAdapter, meth)}

    def chat_to_request(self, req: ChatRequest, media: UploadScope) -> SubmitArgs:
        raise self.no_surface("chat completions")

    def speech_to_request(self, req: SpeechRequest, media: UploadScope) -> SubmitArgs:
        raise self.no_surface("speech")

    def image_to_request(self, req: ImageRequest, media: UploadScope) -> SubmitArgs:
        raise self.no_surface("image generation")

    def edit_to_request(self, req: ImageEditRequest, media: UploadScope) -> SubmitArgs:
        raise self.no_surface("image edits")

    def no_surface(self, what: str) -> NotFoundError:
        return NotFoundError(f"model {self.model!r} does not offer {what} on the OpenAI-compatible API; use /generate")

    # ---- shared translations
    def chat_args(self, req: ChatRequest, media: UploadScope, *, flatten: bool = False) -> SubmitArgs:
        """Messages (media saved), outputs text (+ audio), voice and kwargs: the common chat mapping.

        ``flatten=True`` sends the text of all messages as one prompt instead of structured messages.
        """
        messages, args = convert_messages(req.messages, media)
        if flatten:
            args.text = flatten_text(messages)
        else:
            args.messages = messages
        args.output_modalities = req.modalities
        args.model_kwargs = self.build_kwargs(req)
        if "audio" in req.modalities:
            voice = self.check_voice(req.audio_voice)
            if voice is not None:
                args.model_kwargs[self.voice_key] = voice
        elif req.audio_voice is not None:
            raise InvalidParameterError("'audio' settings need 'audio' in modalities", param="audio")
        return args

    def speech_args(self, req: SpeechRequest) -> SubmitArgs:
        """Text in, audio out, with the voice checked: the common speech mapping."""
        if not req.input.strip():
            raise EmptyInputError("'input' must be non-empty text to speak", param="input")
        kwargs = self.build_kwargs(req)
        voice = self.check_voice(req.voice)
        if voice is not None:
            kwargs[self.voice_key] = voice
        return SubmitArgs(text=req.input, output_modalities=("audio",), model_kwargs=kwargs)

    # ---- voices
    def voice_list(self) -> list[str]:
        """The model's voices: the registry's (:attr:`mstar.registry.ModelInfo.voices`), else the
        runner's ``voice`` Param choices, else the adapter's own (for models registered without voices)."""
        info = get_model_info(self.model)
        if info.voices:
            return list(info.voices)
        spec = self.engine.params.get(self.voice_key)
        if spec is not None and spec.choices:
            return [str(v) for v in spec.choices]
        return list(self.voices)

    def default_voice_name(self) -> str | None:
        info = get_model_info(self.model)
        if info.default_voice is not None:
            return info.default_voice
        spec = self.engine.params.get(self.voice_key)
        if spec is not None and spec.default is not None:
            return str(spec.default)
        return self.default_voice

    def check_voice(self, voice: str | None) -> str | None:
        """Refuse a voice the model does not have (with the list)."""
        if voice is None:
            return None
        if not isinstance(voice, str):
            raise InvalidParameterError("voice must be a string", param="voice")
        known = self.voice_list()
        if not known or voice in known:
            return voice
        by_lower = {v.lower(): v for v in known}
        if voice.lower() in by_lower:  # "ethan" means "Ethan"
            return by_lower[voice.lower()]
        raise UnknownVoiceError(voice, known)

    # ---- kwargs
    def accepted_kwargs(self) -> set[str]:
        return set(self.engine.accepted_kwargs())

    def build_kwargs(self, req: OpenAIRequest) -> dict[str, Any]:
        """Map the given standard sampling fields, then pass extra keys through; refuse the rest with the list."""
        accepted = self.accepted_kwargs()
        unknown = set(req.extra) - accepted
        if unknown:
            raise UnknownParameterError(unknown, set(req.FIELDS) | accepted)
        # Each pass-through value is checked now, by the model's own rule: a route that submits later
        # (the speech WebSocket's session.config) refuses a bad one before any text arrives.
        specs = self.engine.params
        for key, value in req.extra.items():
            if key in specs:
                specs[key].coerce(key, value)
        kwargs = dict(req.extra)
        for name, value in req.sampling.items():
            if value is None:
                continue
            target = self.sampling_keys.get(name)
            if target is None or target not in accepted:
                raise InvalidParameterError(f"model {self.model!r} does not support {name!r}", param=name)
            kwargs.setdefault(target, value)
        return kwargs
