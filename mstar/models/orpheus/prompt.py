"""The Orpheus prompt: ``"{voice}: {text}"`` between the start-of-human and start-of-speech markers."""

from __future__ import annotations

from mstar.errors import UnknownVoiceError
from mstar.models.orpheus.config import PROMPT_SUFFIX, START_OF_HUMAN, VOICES
from mstar.models.orpheus.tokenizer import TextTokenizer

__all__ = ["build_prompt", "check_voice"]


def check_voice(voice: str) -> str:
    """The voice name, normalised; raises :class:`UnknownVoiceError` listing the valid ones."""
    name = voice.strip().lower()
    if name not in VOICES:
        raise UnknownVoiceError(voice, VOICES)
    return name


def build_prompt(tokenizer: TextTokenizer, voice: str, text: str) -> list[int]:
    """Token ids: 128259, BOS, tokens of ``"{voice}: {text}"``, then 128009 128260 128261 128257."""
    return [START_OF_HUMAN, *tokenizer.encode(f"{voice}: {text}"), *PROMPT_SUFFIX]
