"""Joining the audio of consecutive speech chunks with a short equal-power crossfade.

Each chunk of a long text is spoken by its own request, so its audio starts and ends on its
own; butting two chunks together can click where the waveforms do not meet. At each seam the
last ``fade`` samples of one chunk are overlapped with the first ``fade`` samples of the next,
the first weighted by ``cos`` and the second by ``sin`` of a quarter turn (an equal-power
crossfade: for two unrelated signals, as two separately spoken chunks are, the loudness stays
level through the seam, where a linear fade would dip by 3 dB). The joined audio is thus
``fade`` samples shorter per seam than the chunks laid end to end.

Streaming needs no look-ahead beyond the fade: :class:`SeamJoiner` holds back the last
``fade`` samples of what it was given (they may turn out to end a chunk) and lets them go
with the next piece, or at :meth:`SeamJoiner.close`.
"""

from __future__ import annotations

import math

import numpy as np

from mstar.errors import ModelError
from mstar.types import AudioChunk

__all__ = ["DEFAULT_FADE_MS", "SeamJoiner", "fade_samples"]

#: Crossfade length at each seam: long enough to hide a step, short enough not to smear a syllable.
DEFAULT_FADE_MS = 5.0


def fade_samples(sample_rate: int, fade_ms: float = DEFAULT_FADE_MS) -> int:
    """Samples per crossfade at ``sample_rate`` (120 at 24 kHz for 5 ms)."""
    return max(0, round(sample_rate * fade_ms / 1000.0))


class SeamJoiner:
    """Turns the audio chunks of consecutive speech chunks into one stream, crossfading each seam.

    Call :meth:`feed` with each audio chunk and the index of the speech chunk it belongs to
    (non-decreasing), then :meth:`close` once. Samples are int16, interleaved by channel.
    """

    __slots__ = ("_channels", "_held", "_index", "_rate", "fade_ms")

    def __init__(self, fade_ms: float = DEFAULT_FADE_MS) -> None:
        self.fade_ms = fade_ms
        self._rate: int | None = None
        self._channels = 1
        self._index = -1
        self._held = np.zeros((0, 1), dtype=np.int16)  # frames held back: they may end a chunk

    def feed(self, index: int, chunk: AudioChunk) -> AudioChunk | None:
        """The audio that can leave now (None when all of it is held back)."""
        if self._rate is None:
            self._rate, self._channels = chunk.sample_rate, chunk.num_channels
            self._held = np.zeros((0, self._channels), dtype=np.int16)
        elif (chunk.sample_rate, chunk.num_channels) != (self._rate, self._channels):
            raise ModelError(
                f"speech chunk {index} has {chunk.sample_rate} Hz x {chunk.num_channels} channel(s) audio; "
                f"the chunks before it had {self._rate} Hz x {self._channels}"
            )
        if index < self._index:
            raise ValueError(f"speech chunk {index} arrived after chunk {self._index}")
        frames = np.frombuffer(chunk.pcm, dtype="<i2").reshape(-1, self._channels)
        seam = index != self._index and self._index >= 0
        self._index = index
        joined = self._crossfade(self._held, frames) if seam else np.concatenate([self._held, frames])
        keep = min(len(joined), fade_samples(self._rate, self.fade_ms))
        out, self._held = joined[: len(joined) - keep], joined[len(joined) - keep :]
        if not len(out):
            return None
        return AudioChunk(out.astype("<i2").tobytes(), self._rate, self._channels, metadata={**chunk.metadata, "chunk": index})

    def close(self) -> AudioChunk | None:
        """What is still held back (the end of the last chunk), or None."""
        held, self._held = self._held, self._held[:0]
        if self._rate is None or not len(held):
            return None
        return AudioChunk(held.astype("<i2").tobytes(), self._rate, self._channels, metadata={"chunk": self._index})

    @staticmethod
    def _crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
        """``tail`` then ``head``, their ``n`` overlapping frames mixed (n = the shorter's length)."""
        n = min(len(tail), len(head))
        if n == 0:
            return np.concatenate([tail, head])
        t = (np.arange(n, dtype=np.float64) + 0.5) / n
        fade_out = np.cos(t * math.pi / 2)[:, None]
        fade_in = np.sin(t * math.pi / 2)[:, None]
        mixed = tail[len(tail) - n :] * fade_out + head[:n] * fade_in
        mixed = np.clip(np.rint(mixed), -32768, 32767).astype(np.int16)
        return np.concatenate([tail[: len(tail) - n], mixed, head[n:]])
