"""Orpheus: text-to-speech only (``/v1/audio/speech`` and the voices list)."""

from __future__ import annotations

from typing import ClassVar

from mstar.errors import InvalidParameterError
from mstar.server.adapters.base import OpenAIAdapter, SubmitArgs
from mstar.server.media_io import UploadScope
from mstar.server.openai_schema import SpeechRequest

__all__ = ["OrpheusAdapter"]


class OrpheusAdapter(OpenAIAdapter):
    sampling_keys: ClassVar[dict[str, str]] = {"temperature": "temperature", "top_p": "top_p", "seed": "seed"}

    def speech_to_request(self, req: SpeechRequest, media: UploadScope) -> SubmitArgs:
        if req.instructions:
            raise InvalidParameterError("orpheus does not support 'instructions'; choose a voice instead", param="instructions")
        return self.speech_args(req)
