"""Result and event types shared by the Engine, the server and the client.

This module is torch-free on purpose: the HTTP client imports it, and so must
stay installable without torch. Every event converts to and from one NDJSON
wire line ``{"modality", "data" (base64), "metadata"}``; a ``GenerateResult``
converts to and from the non-streaming JSON document
``{"request_id", "outputs": {modality: [{"data", "metadata"}]}}``.
"""

from __future__ import annotations

import base64
import io
import json
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, int]:
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
        return {"modality": "text", "data": _b64(self.text.encode("utf-8")), "metadata": dict(self.metadata)}


@dataclass(frozen=True, slots=True)
class ImageChunk:
    """One generated image as PNG bytes."""

    data: bytes
    metadata: dict[str, Any] = field(default_factory=dict)
    modality: Literal["image"] = "image"

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_bytes(self.data)
        return p

    @property
    def width(self) -> int:
        return int.from_bytes(self.data[16:20], "big") if self.data.startswith(PNG_MAGIC) else 0

    @property
    def height(self) -> int:
        return int.from_bytes(self.data[20:24], "big") if self.data.startswith(PNG_MAGIC) else 0

    def to_wire(self) -> dict[str, Any]:
        return {"modality": "image", "data": _b64(self.data), "metadata": dict(self.metadata)}


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A piece of audio: headerless little-endian int16 PCM."""

    pcm: bytes
    sample_rate: int
    num_channels: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)
    modality: Literal["audio"] = "audio"

    def to_numpy(self) -> np.ndarray:
        import numpy as np

        arr = np.frombuffer(self.pcm, dtype="<i2")
        return arr.reshape(-1, self.num_channels) if self.num_channels > 1 else arr

    def __len__(self) -> int:
        return len(self.pcm) // (2 * self.num_channels)

    def to_wire(self) -> dict[str, Any]:
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
        import numpy as np

        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)

    @classmethod
    def from_numpy(
        cls, array: np.ndarray, modality: Literal["action", "latent"], metadata: dict[str, Any] | None = None
    ) -> TensorChunk:
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
        return {"modality": "progress", "data": "", "metadata": {"step": self.step, "total": self.total, "stage": self.stage}}


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every stream."""

    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    seed: int | None = None
    request_id: str | None = None
    modality: Literal["done"] = "done"

    def to_wire(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"finish_reason": self.finish_reason, "usage": self.usage.to_dict(), "seed": self.seed}
        if self.request_id is not None:
            meta["request_id"] = self.request_id
        return {"modality": "done", "data": "", "metadata": meta}


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

    def to_wire(self) -> dict[str, Any]:
        return {
            "modality": "error",
            "data": _b64(self.message.encode("utf-8")),
            "metadata": {"status": self.status, "message": self.message, "code": self.code},
        }


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
            return ErrorChunk(int(meta.get("status", 500)), message, str(meta.get("code", "error")))
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
        import numpy as np

        arr = np.frombuffer(self.pcm, dtype="<i2")
        return arr.reshape(-1, self.num_channels) if self.num_channels > 1 else arr

    def wav_bytes(self) -> bytes:
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(self.num_channels)
            w.setsampwidth(2)
            w.setframerate(self.sample_rate)
            w.writeframes(self.pcm)
        return buf.getvalue()

    def to_wav(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_bytes(self.wav_bytes())
        return p

    @classmethod
    def from_chunks(cls, chunks: list[AudioChunk]) -> AudioBuffer | None:
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
        return self.images[0] if self.images else None

    def save_image(self, path: str | Path, index: int = 0) -> Path:
        if not self.images:
            raise ValueError("this result holds no image")
        p = Path(path)
        p.write_bytes(self.images[index])
        return p

    def save_audio(self, path: str | Path) -> Path:
        if self.audio is None:
            raise ValueError("this result holds no audio")
        return self.audio.to_wav(path)

    # ---- wire
    def to_json(self) -> dict[str, Any]:
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
