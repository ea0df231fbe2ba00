"""Convenience methods shared by the Engine and the client, written once over ``generate``.

Torch-free: the client inherits it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from mstar.errors import MStarError
from mstar.media import MediaArg
from mstar.types import AudioBuffer, GenerateResult

__all__ = ["ClosingStream", "GenerateSugar"]

StreamT = TypeVar("StreamT")


class ClosingStream:
    """An event stream that is closed (its request cancelled) when left early: by
    ``close()``, a ``with`` block, or garbage collection."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> ClosingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class GenerateSugar(Generic[StreamT]):
    """``stream``, ``chat``, ``tts``, ``generate_image`` and ``edit_image`` over ``generate``."""

    def generate(self, **kwargs: Any) -> GenerateResult | StreamT:
        """Run one request (``Engine.generate`` / ``MStarClient.generate``); the sugar calls this."""
        raise NotImplementedError

    def _result(self, **kwargs: Any) -> GenerateResult:
        res = self.generate(stream=False, **kwargs)
        assert isinstance(res, GenerateResult)
        return res

    def stream(self, **kwargs: Any) -> StreamT:
        """Sugar for ``generate(stream=True, ...)``."""
        kwargs["stream"] = True
        return self.generate(**kwargs)  # type: ignore[return-value]

    def chat(
        self,
        prompt: str | list[dict[str, Any]],
        *,
        images: MediaArg | list[MediaArg] | None = None,
        audio: MediaArg | list[MediaArg] | None = None,
        video: MediaArg | list[MediaArg] | None = None,
        output_modalities: Sequence[str] | str = ("text",),
        stream: bool = False,
        **kwargs: Any,
    ) -> GenerateResult | StreamT:
        """Chat with a prompt string or a list of ``{"role", "content"}`` messages."""
        kwargs["text" if isinstance(prompt, str) else "messages"] = prompt
        return self.generate(
            images=images, audio=audio, video=video, output_modalities=output_modalities, stream=stream, **kwargs
        )

    def tts(self, text: str, *, voice: str | None = None, **kwargs: Any) -> AudioBuffer:
        """Speak ``text``; returns the whole utterance as an :class:`AudioBuffer`."""
        res = self._result(text=text, output_modalities=("audio",), voice=voice, **kwargs)
        if res.audio is None:
            raise MStarError(f"no audio was produced (finish_reason={res.finish_reason})")
        return res.audio

    def generate_image(self, prompt: str, **kwargs: Any) -> bytes:
        """Text to image; returns PNG bytes."""
        return self._first_image(self._result(text=prompt, output_modalities=("image",), **kwargs))

    def edit_image(self, image: MediaArg, prompt: str, **kwargs: Any) -> bytes:
        """Edit ``image`` following ``prompt``; returns PNG bytes."""
        return self._first_image(self._result(text=prompt, images=image, output_modalities=("image",), **kwargs))

    @staticmethod
    def _first_image(res: GenerateResult) -> bytes:
        if not res.images:
            raise MStarError(f"no image was produced (finish_reason={res.finish_reason})")
        return res.images[0]
