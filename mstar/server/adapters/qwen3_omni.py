"""Qwen3-Omni: multimodal chat (text, optionally with speech) and text-to-speech.

Text sampling belongs to the Thinker (``thinker_*`` keys), speech to the
Talker (``talker_*``, passed through ``extra_body``); the speaker is ``voice``.
``use_audio_in_video`` (``extra_body``) makes the model hear each video's
audio track along with its frames.
"""

from __future__ import annotations

from typing import ClassVar

from mstar.errors import InvalidParameterError
from mstar.server.adapters.base import OpenAIAdapter, SubmitArgs
from mstar.server.media_io import UploadScope
from mstar.server.openai_schema import ChatRequest, SpeechRequest

__all__ = ["Qwen3OmniAdapter"]


class Qwen3OmniAdapter(OpenAIAdapter):
    sampling_keys: ClassVar[dict[str, str]] = {
        "temperature": "thinker_temperature",
        "top_p": "thinker_top_p",
        "max_tokens": "max_output_tokens",
        "seed": "seed",
    }

    def chat_to_request(self, req: ChatRequest, media: UploadScope) -> SubmitArgs:
        return self.chat_args(req, media)

    def speech_to_request(self, req: SpeechRequest, media: UploadScope) -> SubmitArgs:
        if req.instructions:
            raise InvalidParameterError("qwen3_omni speech does not take 'instructions'", param="instructions")
        args = self.speech_args(req)
        # The Talker speaks what the Thinker writes, so the Thinker is asked to write the input
        # back verbatim; both outputs are requested and the speech route keeps the audio.
        args.messages = [{"role": "system", "content": _READ_ALOUD}, {"role": "user", "content": args.text}]
        args.text = None
        args.output_modalities = ("text", "audio")
        return args


_READ_ALOUD = "You are a text-to-speech voice. Read the user's text aloud exactly as written, adding nothing."
