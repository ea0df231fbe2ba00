"""Encoding the models' raw int16 PCM into the audio formats the API offers.

Every format is really encoded (PyAV for the compressed ones); a format that
cannot be encoded raises :class:`~mstar.errors.InvalidParameterError` naming
it, never a silent fallback to another format. :class:`StreamingEncoder`
encodes chunk by chunk so speech can be streamed as it is generated.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from mstar.errors import InvalidParameterError

__all__ = [
    "AUDIO_FORMATS",
    "StreamingEncoder",
    "TimeStretcher",
    "encode_pcm16",
    "ensure_encodable",
    "mime_type",
    "wav_header",
]


@dataclass(frozen=True, slots=True)
class _Format:
    mime: str
    container: str | None  # PyAV muxer; None for formats written by hand (wav, pcm)
    codec: str | None
    sample_fmt: str | None
    rates: tuple[int, ...] = ()  # rates the codec accepts; empty: any


AUDIO_FORMATS: dict[str, _Format] = {
    "wav": _Format("audio/wav", None, None, None),
    "pcm": _Format("audio/pcm", None, None, None),
    "flac": _Format("audio/flac", "flac", "flac", "s16"),
    "mp3": _Format("audio/mpeg", "mp3", "libmp3lame", "s16p", (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
    "opus": _Format("audio/ogg", "ogg", "libopus", "s16", (8000, 12000, 16000, 24000, 48000)),
    "aac": _Format("audio/aac", "adts", "aac", "fltp"),
}


def _spec(fmt: str) -> _Format:
    spec = AUDIO_FORMATS.get(fmt)
    if spec is None:
        raise InvalidParameterError(
            f"audio format {fmt!r} is not supported; choose one of: {', '.join(AUDIO_FORMATS)}", param="response_format"
        )
    return spec


@functools.cache
def _probe(fmt: str) -> str | None:
    try:
        StreamingEncoder(fmt, 24000).close()
    except InvalidParameterError as exc:
        return exc.message
    return None


def ensure_encodable(fmt: str) -> None:
    """Raise :class:`InvalidParameterError` (400) now if ``fmt`` cannot be encoded here."""
    _spec(fmt)
    problem = _probe(fmt)
    if problem is not None:
        raise InvalidParameterError(problem, param="response_format")


def mime_type(fmt: str) -> str:
    """The Content-Type of an audio format."""
    return _spec(fmt).mime


def wav_header(sample_rate: int, num_channels: int = 1, data_bytes: int | None = None) -> bytes:
    """A 44-byte PCM WAV header; with ``data_bytes=None`` the sizes say "unknown length" (for streaming)."""
    unknown = 0xFFFFFFFF
    data_size = unknown if data_bytes is None else data_bytes
    riff_size = unknown if data_bytes is None else 36 + data_bytes
    block = 2 * num_channels
    return (
        b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, num_channels, sample_rate, sample_rate * block, block, 16)
        + b"data" + struct.pack("<I", data_size)
    )


class _Sink(io.RawIOBase):
    """A write-only, non-seekable byte sink; muxers then write a pure stream."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.parts.append(data)
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


class StreamingEncoder:
    """Encode int16 PCM chunk by chunk: ``feed(pcm) -> bytes`` then ``close() -> bytes``.

    The concatenation of everything returned is one valid file of ``fmt``. A
    streamed WAV's header says "unknown length" (its sizes are not known when it
    goes out); with ``complete=True`` a WAV is held back and :meth:`close`
    returns the whole file with its real sizes, for responses sent in one piece.
    """

    def __init__(self, fmt: str, sample_rate: int, num_channels: int = 1, *, complete: bool = False) -> None:
        self.fmt = fmt
        self.complete = complete and fmt == "wav"
        self._held: list[bytes] = []
        self.spec = _spec(fmt)
        self.sample_rate = sample_rate
        self.num_channels = num_channels
        self._started = False
        self._closed = False
        self._container: Any = None
        if self.spec.container is not None:
            self._open_av()

    def _open_av(self) -> None:
        import av

        spec = self.spec
        layout = "mono" if self.num_channels == 1 else "stereo"
        out_rate = self.sample_rate
        if spec.rates and out_rate not in spec.rates:
            out_rate = min(spec.rates, key=lambda r: (r < self.sample_rate, abs(r - self.sample_rate)))
        self._sink = _Sink()
        try:
            self._container = av.open(self._sink, mode="w", format=spec.container)
            stream = self._container.add_stream(spec.codec, rate=out_rate)
            stream.layout = layout
            stream.format = spec.sample_fmt
        except Exception as exc:  # an FFmpeg build without this encoder
            raise InvalidParameterError(
                f"audio format {self.fmt!r} cannot be encoded by this server's FFmpeg build: {exc}", param="response_format"
            ) from exc
        self._stream = stream
        self._resampler = av.AudioResampler(format=spec.sample_fmt, layout=layout, rate=out_rate)
        self._fifo = av.AudioFifo()
        self._pts = 0

    def _encode_frames(self, flush: bool) -> None:
        frame_size = self._stream.codec_context.frame_size or 1024
        while True:
            if self._fifo.samples >= frame_size:
                frame = self._fifo.read(frame_size)
            elif flush and self._fifo.samples:
                frame = self._fifo.read()
            else:
                break
            if frame is None:
                break
            frame.pts = self._pts
            self._pts += frame.samples
            for packet in self._stream.encode(frame):
                self._container.mux(packet)

    def feed(self, pcm: bytes) -> bytes:
        """Encode one chunk of int16 PCM; returns the bytes ready so far (maybe none)."""
        if self._closed:
            raise RuntimeError("encoder is closed")
        if self.complete:
            self._held.append(pcm)
            return b""
        if self.spec.container is None:
            head = b""
            if not self._started and self.fmt == "wav":
                head = wav_header(self.sample_rate, self.num_channels)
            self._started = True
            return head + pcm
        self._started = True
        if pcm:
            self._push(pcm)
            self._encode_frames(flush=False)
        return self._sink.take()

    def _push(self, pcm: bytes) -> None:
        import av

        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)  # packed s16: one plane, channels interleaved
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono" if self.num_channels == 1 else "stereo")
        frame.sample_rate = self.sample_rate
        for out in self._resampler.resample(frame):
            self._fifo.write(out)

    def close(self) -> bytes:
        """Flush the encoder and the container trailer."""
        if self._closed:
            return b""
        self._closed = True
        if self.complete:
            pcm = b"".join(self._held)
            self._held.clear()
            return wav_header(self.sample_rate, self.num_channels, len(pcm)) + pcm
        if self.spec.container is None:
            return b"" if self._started or self.fmt != "wav" else wav_header(self.sample_rate, self.num_channels)
        for out in self._resampler.resample(None):
            self._fifo.write(out)
        self._encode_frames(flush=True)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()


def encode_pcm16(pcm: bytes, sample_rate: int, fmt: str, num_channels: int = 1) -> bytes:
    """Encode a whole utterance of int16 PCM into ``fmt`` (wav with exact sizes)."""
    if fmt == "wav":
        return wav_header(sample_rate, num_channels, len(pcm)) + pcm
    enc = StreamingEncoder(fmt, sample_rate, num_channels)
    return enc.feed(pcm) + enc.close()


class TimeStretcher:
    """Change speech speed without changing pitch (FFmpeg's ``atempo``), chunk by chunk."""

    def __init__(self, speed: float, sample_rate: int, num_channels: int = 1) -> None:
        import av

        if not 0.25 <= speed <= 4.0:
            raise InvalidParameterError(f"speed must be between 0.25 and 4.0, got {speed}", param="speed")
        self.sample_rate = sample_rate
        self.layout = "mono" if num_channels == 1 else "stereo"
        graph = av.filter.Graph()
        src = graph.add_abuffer(format="s16", sample_rate=sample_rate, layout=self.layout, time_base=Fraction(1, sample_rate))
        # atempo takes 0.5..2.0 per instance: chain two for the outer range.
        factors = [speed] if 0.5 <= speed <= 2.0 else [speed ** 0.5, speed ** 0.5]
        nodes = [src] + [graph.add("atempo", f"{f:.6f}") for f in factors]
        nodes.append(graph.add("aformat", f"sample_fmts=s16:sample_rates={sample_rate}:channel_layouts={self.layout}"))
        nodes.append(graph.add("abuffersink"))
        graph.link_nodes(*nodes).configure()
        self._graph = graph
        self._pts = 0

    def _drain(self) -> bytes:
        import av

        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            out.append(frame.to_ndarray().astype("<i2").tobytes())
        return b"".join(out)

    def feed(self, pcm: bytes) -> bytes:
        import av

        if not pcm:
            return b""
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout=self.layout)
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += frame.samples
        self._graph.push(frame)
        return self._drain()

    def close(self) -> bytes:
        self._graph.push(None)
        return self._drain()
