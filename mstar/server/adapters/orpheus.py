"""Orpheus: text-to-speech only (``/v1/audio/speech`` and the voices list)."""

from __future__ import annotations

from typing import ClassVar

from mstar.errors import EmptyInputError, InvalidParameterError
from mstar.server.adapters.base import OpenAIAdapter, SpeechRequest, SubmitArgs
from mstar.server.media_io import UploadScope

__all__ = ["OrpheusAdapter"]


class OrpheusAdapter(OpenAIAdapter):
    sampling_keys: ClassVar[dict[str, str]] = {"temperature": "temperature", "top_p": "top_p", "seed": "seed"}
    voices: ClassVar[tuple[str, ...]] = ("tara", "zoe", "zac", "jess", "leo", "mia", "julia", "leah")
    default_voice: ClassVar[str | None] = "tara"

    def speech_to_request(self, req: SpeechRequest, media: UploadScope) -> SubmitArgs:
        if not req.input.strip():
            raise EmptyInputError("input must be non-empty text to speak", param="input")
        if req.instructions:
            raise InvalidParameterError("orpheus does not support 'instructions'; choose a voice instead", param="instructions")
        kwargs = self.build_kwargs(req)
        voice = self.check_voice(req.voice)
        if voice is not None:
            kwargs["voice"] = voice
        return SubmitArgs(text=req.input, output_modalities=("audio",), model_kwargs=kwargs)

