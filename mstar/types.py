"""Result and event types shared by the Engine, the server and the client.

This module is torch-free on purpose: the HTTP client imports it, and so must
stay installable without torch. Every event converts to and from one NDJSON
wire line ``{"modality", "data" (base64), "metadata"}``; a ``GenerateResult``
converts to and from the non-streaming JSON document
``{"request_id", "outputs": {modality: [{"data", "metadata"}]}}``.

Every type has a short ``repr`` (duration and sample rate, PNG size, tensor shape, finish
reason and seed; never the raw bytes), and Jupyter shows media inline through the duck-typed
hooks: audio as an ``<audio controls>`` player (``_repr_html_``), images as PNG
(``_repr_png_``), a ``GenerateResult`` as its text, images, player and tensor shapes together.
Inline media is capped (see :mod:`mstar._display`).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mstar import _display
from mstar.sniff import PNG_MAGIC

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "FINISH_REASONS",
    "AudioBuffer",
    "AudioChunk",
    "ErrorChunk",
    "Event",
    "FinishReason",
    "Finished",
    "GenerateResult",
    "ImageChunk",
    "Progress",
    "TensorChunk",
    "TextChunk",
    "Usage",
    "event_from_wire",
    "event_to_ndjson",
]

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "cancelled", "timeout", "error")
TENSOR_MODALITIES: tuple[str, ...] = ("action", "latent")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: str) -> bytes:
    return base64.b64decode(data, validate=True) if data else b""


# OpenAI's chat API spells input and output tokens its own way (its speech API uses ours).
_OPENAI_CHAT_USAGE = {"input_tokens": "prompt_tokens", "output_tokens": "completion_tokens"}


@dataclass(frozen=True, slots=True)
class Usage:
    """Token and step counts for one request."""

    input_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __repr__(self) -> str:
        return f"Usage(input_tokens={self.input_tokens}, output_tokens={self.output_tokens}, steps={self.steps})"

    def to_dict(self) -> dict[str, int]:
        """The wire form: ``{"input_tokens", "output_tokens", "steps"}``."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "steps": self.steps,
        }

    def to_openai(self, *, chat: bool = True) -> dict[str, int]:
        """OpenAI's ``usage`` object: ``prompt_tokens``/``completion_tokens`` for chat
        completions, ``input_tokens``/``output_tokens`` (``chat=False``) for speech; with ``total_tokens``."""
        counts = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        doc = {(_OPENAI_CHAT_USAGE[k] if chat else k): v for k, v in counts.items()}
        doc["total_tokens"] = self.total_tokens
        return doc

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Usage:
        """Parse the wire form (OpenAI's ``prompt_tokens``/``completion_tokens`` spellings too)."""
        d = d or {}

        def count(key: str) -> int:
            # Accept the OpenAI spellings too: clients meet both in the wild.
            return int(d.get(key, d.get(_OPENAI_CHAT_USAGE.get(key, key), 0)) or 0)

        return cls(input_tokens=count("input_tokens"), output_tokens=count("output_tokens"), steps=count("steps"))


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class TextChunk:
    """A piece of generated text (UTF-8 on the wire)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    modality: Literal["text"] = "text"

    def to_wire(self) -> dict[str, Any]:
        """The NDJSON wire object of this event."""
        return {"modality": "text", "data": _b64(self.text.encode("utf-8")), "metadata": dict(self.metadata)}

    def __repr__(self) -> str:
        return f"TextChunk({_display.short(self.text, 60)})"


@dataclass(frozen=True, slots=True)
class ImageChunk:
    """One generated image as PNG bytes."""

    data: bytes
    metadata: dict[str, Any] = field(default_factory=dict)
    modality: Literal["image"] = "image"

    def save(self, path: str | Path) -> Path:
        """Write the PNG bytes to ``path``; returns the path."""
        p = Path(path)
        p.write_bytes(self.data)
        return p

    @property
    def width(self) -> int:
        """Width in pixels read from the PNG header (0 when the bytes are not a PNG)."""
        return int.from_bytes(self.data[16:20], "big") if self.data.startswith(PNG_MAGIC) else 0

    @property
    def height(self) -> int:
        """Height in pixels read from the PNG header (0 when the bytes are not a PNG)."""
        return int.from_bytes(self.data[20:24], "big") if self.data.startswith(PNG_MAGIC) else 0

    def to_wire(self) -> dict[str, Any]:
        """The NDJSON wire object of this event."""
        return {"modality": "image", "data": _b64(self.data), "metadata": dict(self.metadata)}

    def __repr__(self) -> str:
        return f"ImageChunk({_display.image_summary(self.data)})"

    def _repr_png_(self) -> bytes | None:
        """Jupyter shows the image inline."""
        return self.data if self.data.startswith(PNG_MAGIC) else None


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A piece of audio: headerless little-endian int16 PCM."""

    pcm: bytes
    sample_rate: int
    num_channels: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)
    modality: Literal["audio"] = "audio"

    def to_numpy(self) -> np.ndarray:
        """The samples as int16: shape ``[n]`` for mono, ``[n, channels]`` otherwise."""
        import numpy as np

        arr = np.frombuffer(self.pcm, dtype="<i2")
        return arr.reshape(-1, self.num_channels) if self.num_channels > 1 else arr

    def __len__(self) -> int:
        return len(self.pcm) // (2 * self.num_channels)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self) / float(self.sample_rate) if self.sample_rate else 0.0

    def __repr__(self) -> str:
        return f"AudioChunk({_display.audio_summary(len(self), self.sample_rate, self.num_channels)}, {len(self)} samples)"

    def _repr_html_(self) -> str:
        """Jupyter shows an audio player."""
        return _display.audio_html(self.pcm, self.sample_rate, self.num_channels)

    def to_wire(self) -> dict[str, Any]:
        """The NDJSON wire object of this event (sample rate and channels in its metadata)."""
        meta = dict(self.metadata)
        meta.update(sample_rate=self.sample_rate, num_channels=self.num_channels)
        return {"modality": "audio", "data": _b64(self.pcm), "metadata": meta}


@dataclass(frozen=True, slots=True)
class TensorChunk:
    """A tensor output (robot actions, world-model latents): raw bytes plus dtype and shape."""

    data: bytes
    dtype: str
    shape: tuple[int, ...]
    modality: Literal["action", "latent"] = "action"
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_numpy(self) -> np.ndarray:
        """The tensor as a read-only numpy array of ``shape`` and ``dtype``."""
        import numpy as np

        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)

    def __repr__(self) -> str:
        keys = ", ".join(map(str, sorted(self.metadata, key=str)))
        meta = f", metadata: {keys[:80]}{'…' if len(keys) > 80 else ''}" if keys else ""
        return f"TensorChunk({_display.tensor_summary(self.modality, self.dtype, self.shape)}{meta})"

    @classmethod
    def from_numpy(
        cls, array: np.ndarray, modality: Literal["action", "latent"], metadata: dict[str, Any] | None = None
    ) -> TensorChunk:
        """Wrap a numpy array (stored little-endian, C order) as an ``action`` or ``latent`` output."""
        import numpy as np

        arr = np.ascontiguousarray(array)
        le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        return cls(
            data=le.tobytes(),
            dtype=str(arr.dtype.name),
            shape=tuple(int(s) for s in arr.shape),
            modality=modality,
            metadata=dict(metadata or {}),
        )

    def to_wire(self) -> dict[str, Any]:
        """The NDJSON wire object of this event (dtype and shape in its metadata)."""
        meta = dict(self.metadata)
        meta.update(dtype=self.dtype, shape=list(self.shape))
        return {"modality": self.modality, "data": _b64(self.data), "metadata": meta}


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress of a long stage (for example denoising step ``step`` of ``total``)."""

    step: int
    total: int
    stage: str = ""
    modality: Literal["progress"] = "progress"

    def to_wire(self) -> dict[str, Any]:
        """The NDJSON wire object of this event."""
        return {"modality": "progress", "data": "", "metadata": {"step": self.step, "total": self.total, "stage": self.stage}}

    def __repr__(self) -> str:
        stage = f"{_display.short(self.stage, 30)}, " if self.stage else ""
        return f"Progress({stage}{self.step}/{self.total})"


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every stream."""

    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    seed: int | None = None
    request_id: str | None = None
    modality: Literal["done"] = "done"

    def to_wire(self) -> dict[str, Any]:
        """The NDJSON wire object of this event."""
        meta: dict[str, Any] = {"finish_reason": self.finish_reason, "usage": self.usage.to_dict(), "seed": self.seed}
        if self.request_id is not None:
            meta["request_id"] = self.request_id
        return {"modality": "done", "data": "", "metadata": meta}

    def __repr__(self) -> str:
        rid = f", request_id={_display.short(self.request_id, 36)}" if self.request_id is not None else ""
        return f"Finished({self.finish_reason!r}, seed={self.seed}, {self.usage!r}{rid})"


@dataclass(frozen=True, slots=True)
class ErrorChunk:
    """An error reported in-band after a stream began (``modality: "error"`` on the wire).

    The Engine raises instead of yielding this; the server writes it and the
    client turns it back into the matching exception from :mod:`mstar.errors`.
    """

    status: int
    message: str
    code: str = "error"
    modality: Literal["error"] = "error"
    #: The request field the error is about, as in the error body's ``param`` (None when none).
    param: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The NDJSON wire object of this error line."""
        meta: dict[str, Any] = {"status": self.status, "message": self.message, "code": self.code}
        if self.param is not None:
            meta["param"] = self.param
        return {"modality": "error", "data": _b64(self.message.encode("utf-8")), "metadata": meta}

    def __repr__(self) -> str:
        return f"ErrorChunk({self.status}, {self.code!r}, {_display.short(self.message, 120)})"


Event = TextChunk | ImageChunk | AudioChunk | TensorChunk | Progress | Finished
WireEvent = Event | ErrorChunk


def event_to_ndjson(event: WireEvent) -> bytes:
    """Serialise one event as an NDJSON line (with the trailing newline)."""
    return (json.dumps(event.to_wire(), separators=(",", ":")) + "\n").encode("utf-8")


def event_from_wire(obj: dict[str, Any]) -> WireEvent:
    """Parse one wire line (already JSON-decoded) back into its typed event.

    Raises ``ValueError`` naming the problem when the line is not a valid event.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"wire line must be a JSON object, got {type(obj).__name__}")
    modality = obj.get("modality")
    data = obj.get("data", "") or ""
    meta = obj.get("metadata") or {}
    if not isinstance(modality, str):
        raise ValueError("wire line has no 'modality' string")
    if not isinstance(data, str) or not isinstance(meta, dict):
        raise ValueError("wire line 'data' must be a base64 string and 'metadata' an object")
    try:
        raw = _unb64(data)
    except ValueError as exc:
        raise ValueError(f"wire line for {modality!r} has invalid base64 data") from exc
    try:
        if modality == "text":
            return TextChunk(raw.decode("utf-8"), metadata=meta)
        if modality == "image":
            return ImageChunk(raw, metadata=meta)
        if modality == "audio":
            rest = {k: v for k, v in meta.items() if k not in ("sample_rate", "num_channels")}
            return AudioChunk(raw, int(meta["sample_rate"]), int(meta.get("num_channels", 1)), metadata=rest)
        if modality in TENSOR_MODALITIES:
            rest = {k: v for k, v in meta.items() if k not in ("dtype", "shape")}
            shape = tuple(int(s) for s in meta["shape"])
            chunk = TensorChunk(raw, str(meta["dtype"]), shape, modality=modality, metadata=rest)  # type: ignore[arg-type]
            _check_tensor_size(chunk)
            return chunk
        if modality == "progress":
            return Progress(int(meta["step"]), int(meta["total"]), str(meta.get("stage", "")))
        if modality == "done":
            reason = meta.get("finish_reason", "stop")
            if reason not in FINISH_REASONS:
                raise ValueError(f"unknown finish_reason {reason!r}")
            seed = meta.get("seed")
            return Finished(reason, Usage.from_dict(meta.get("usage")), None if seed is None else int(seed), meta.get("request_id"))
        if modality == "error":
            message = str(meta.get("message") or raw.decode("utf-8", "replace"))
            param = meta.get("param")
            return ErrorChunk(
                int(meta.get("status", 500)), message, str(meta.get("code", "error")),
                param=None if param is None else str(param),
            )
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed {modality!r} wire line: {exc!r}") from exc
    raise ValueError(f"unknown modality {modality!r} on the wire")


def _check_tensor_size(chunk: TensorChunk) -> None:
    import numpy as np

    expected = int(np.prod(chunk.shape, dtype=np.int64)) * np.dtype(chunk.dtype).itemsize
    if expected != len(chunk.data):
        raise ValueError(f"tensor of shape {chunk.shape} and dtype {chunk.dtype} needs {expected} bytes, got {len(chunk.data)}")


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class AudioBuffer:
    """Decoded speech: int16 PCM with its sample rate. ``len()`` is the number of samples."""

    pcm: bytes
    sample_rate: int
    num_channels: int = 1

    def __len__(self) -> int:
        return len(self.pcm) // (2 * self.num_channels)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self) / float(self.sample_rate) if self.sample_rate else 0.0

    def to_numpy(self) -> np.ndarray:
        """The samples as int16: shape ``[n]`` for mono, ``[n, channels]`` otherwise."""
        import numpy as np

        arr = np.frombuffer(self.pcm, dtype="<i2")
        return arr.reshape(-1, self.num_channels) if self.num_channels > 1 else arr

    def wav_bytes(self) -> bytes:
        """The audio as a WAV file in memory."""
        return _display.wav_bytes(self.pcm, self.sample_rate, self.num_channels)

    def to_wav(self, path: str | Path) -> Path:
        """Write the audio to ``path`` as a WAV file; returns the path."""
        p = Path(path)
        p.write_bytes(self.wav_bytes())
        return p

    def __repr__(self) -> str:
        return f"AudioBuffer({_display.audio_summary(len(self), self.sample_rate, self.num_channels)}, {len(self)} samples)"

    def _repr_html_(self) -> str:
        """Jupyter shows an audio player (the first :data:`mstar._display.MAX_INLINE_AUDIO_SECONDS` seconds)."""
        return _display.audio_html(self.pcm, self.sample_rate, self.num_channels)

    @classmethod
    def from_chunks(cls, chunks: list[AudioChunk]) -> AudioBuffer | None:
        """Join streamed audio chunks into one buffer (None when there are none)."""
        if not chunks:
            return None
        return cls(b"".join(c.pcm for c in chunks), chunks[0].sample_rate, chunks[0].num_channels)


@dataclass(slots=True)
class GenerateResult:
    """Everything one request produced, gathered."""

    request_id: str
    text: str = ""
    images: list[bytes] = field(default_factory=list)
    audio: AudioBuffer | None = None
    tensors: list[TensorChunk] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    seed: int | None = None
    usage: Usage = field(default_factory=Usage)
    raw: dict[str, Any] | None = None

    # ---- building
    @classmethod
    def from_events(cls, request_id: str, events: list[Event]) -> GenerateResult:
        """Gather a stream of events into one result."""
        texts: list[str] = []
        audio: list[AudioChunk] = []
        res = cls(request_id=request_id)
        for ev in events:
            if isinstance(ev, TextChunk):
                texts.append(ev.text)
            elif isinstance(ev, ImageChunk):
                res.images.append(ev.data)
            elif isinstance(ev, AudioChunk):
                audio.append(ev)
            elif isinstance(ev, TensorChunk):
                res.tensors.append(ev)
            elif isinstance(ev, Finished):
                res.finish_reason = ev.finish_reason
                res.seed = ev.seed
                res.usage = ev.usage
        res.text = "".join(texts)
        res.audio = AudioBuffer.from_chunks(audio)
        return res

    # ---- conveniences
    @property
    def image(self) -> bytes | None:
        """The first image's PNG bytes, or None when the result holds no image."""
        return self.images[0] if self.images else None

    def save_image(self, path: str | Path, index: int = 0) -> Path:
        """Write image ``index`` (PNG bytes) to ``path``; returns the path.

        Raises ``ValueError`` when the result holds no image.
        """
        if not self.images:
            raise ValueError("this result holds no image")
        p = Path(path)
        p.write_bytes(self.images[index])
        return p

    def save_audio(self, path: str | Path) -> Path:
        """Write the audio to ``path`` as a WAV file; returns the path.

        Raises ``ValueError`` when the result holds no audio.
        """
        if self.audio is None:
            raise ValueError("this result holds no audio")
        return self.audio.to_wav(path)

    # ---- display
    def __repr__(self) -> str:
        parts = [f"request_id={_display.short(self.request_id, 12)}", f"finish_reason={self.finish_reason!r}", f"seed={self.seed}"]
        if self.text:
            parts.append(f"text={_display.short(self.text, 30)}")
        if self.audio is not None:
            a = self.audio
            parts.append(f"audio=({_display.audio_summary(len(a), a.sample_rate, a.num_channels)})")
        if self.images:
            more = f" +{len(self.images) - 1}" if len(self.images) > 1 else ""
            parts.append(f"images=[{_display.image_summary(self.images[0]).split(',')[0]}{more}]")
        if self.tensors:
            t = self.tensors[0]
            more = f" +{len(self.tensors) - 1}" if len(self.tensors) > 1 else ""
            parts.append(f"tensors=[{_display.tensor_summary(t.modality, t.dtype, t.shape)}{more}]")
        u = self.usage
        parts.append(f"tokens={u.input_tokens} in/{u.output_tokens} out")
        return f"GenerateResult({', '.join(parts)})"

    def _repr_html_(self) -> str:
        """Jupyter shows the text, the images, an audio player and the tensors' shapes together."""
        rows = [
            f"<div><code>{html.escape(f'request {self.request_id}: {self.finish_reason}, seed {self.seed}, ')}"
            f"{self.usage.input_tokens} input / {self.usage.output_tokens} output tokens</code></div>"
        ]
        if self.text:
            rows.append(_display.text_html(self.text))
        shown = self.images[: _display.MAX_INLINE_IMAGES]
        if shown:
            rows.append("<div>" + "".join(_display.image_html(img) for img in shown) + "</div>")
        if len(self.images) > len(shown):
            rows.append(f"<div><small>… and {len(self.images) - len(shown)} more images (see .images)</small></div>")
        if self.audio is not None:
            rows.append(self.audio._repr_html_())
        for t in self.tensors:
            rows.append(f"<div><code>{html.escape(repr(t))}</code></div>")
        return "<div>" + "".join(rows) + "</div>"

    # ---- wire
    def to_json(self) -> dict[str, Any]:
        """The non-streaming JSON document of this result (what ``POST /generate`` answers)."""
        outputs: dict[str, list[dict[str, Any]]] = {}
        if self.text:
            outputs["text"] = [TextChunk(self.text).to_wire()]
        for img in self.images:
            outputs.setdefault("image", []).append(ImageChunk(img).to_wire())
        if self.audio is not None:
            outputs["audio"] = [AudioChunk(self.audio.pcm, self.audio.sample_rate, self.audio.num_channels).to_wire()]
        for t in self.tensors:
            outputs.setdefault(t.modality, []).append(t.to_wire())
        for entries in outputs.values():
            for e in entries:
                e.pop("modality", None)
        return {
            "request_id": self.request_id,
            "outputs": outputs,
            "finish_reason": self.finish_reason,
            "seed": self.seed,
            "usage": self.usage.to_dict(),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> GenerateResult:
        """Parse the non-streaming JSON document. Raises ``ValueError`` when malformed."""
        if not isinstance(doc, dict) or not isinstance(doc.get("outputs", {}), dict):
            raise ValueError("response is not a generate result document")
        events: list[Event] = []
        for modality, entries in (doc.get("outputs") or {}).items():
            if not isinstance(entries, list):
                raise ValueError(f"outputs[{modality!r}] must be a list")
            for entry in entries:
                if not isinstance(entry, dict):
                    raise ValueError(f"outputs[{modality!r}] entries must be objects")
                ev = event_from_wire({"modality": modality, **entry})
                if isinstance(ev, ErrorChunk):
                    continue
                events.append(ev)
        reason = doc.get("finish_reason", "stop")
        seed = doc.get("seed")
        events.append(
            Finished(
                reason if reason in FINISH_REASONS else "stop",
                Usage.from_dict(doc.get("usage")),
                None if seed is None else int(seed),
            )
        )
        res = cls.from_events(str(doc.get("request_id", "")), events)
        res.raw = doc
        return res
