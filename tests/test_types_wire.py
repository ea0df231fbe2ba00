"""Events and results survive the wire round trip unchanged."""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import pytest

from mstar.types import (
    AudioBuffer,
    AudioChunk,
    ErrorChunk,
    Finished,
    GenerateResult,
    ImageChunk,
    Progress,
    TensorChunk,
    TextChunk,
    Usage,
    event_from_wire,
    event_to_ndjson,
)

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


@pytest.mark.parametrize(
    "event",
    [
        TextChunk("héllo ✓"),
        ImageChunk(PNG_1x1),
        AudioChunk(np.arange(10, dtype="<i2").tobytes(), 24000),
        TensorChunk.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), "action"),
        TensorChunk.from_numpy(np.ones((4, 8), dtype=np.float32), "latent", {"frames": 2}),
        Progress(3, 50, "denoise"),
        Finished("length", Usage(5, 7, 7), seed=42, request_id="r1"),
        ErrorChunk(500, "boom", "model_error"),
    ],
)
def test_every_event_round_trips_through_one_ndjson_line(event: object) -> None:
    line = event_to_ndjson(event)  # type: ignore[arg-type]
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert event_from_wire(json.loads(line)) == event


def test_done_line_has_empty_data_and_finish_metadata() -> None:
    wire = Finished("stop", Usage(1, 2, 3), seed=9).to_wire()
    assert wire["modality"] == "done" and wire["data"] == ""
    assert wire["metadata"]["finish_reason"] == "stop" and wire["metadata"]["seed"] == 9
    assert wire["metadata"]["usage"]["output_tokens"] == 2


def test_tensor_chunk_keeps_dtype_and_shape() -> None:
    arr = np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32)
    back = event_from_wire(TensorChunk.from_numpy(arr, "action").to_wire())
    assert isinstance(back, TensorChunk)
    assert back.shape == (50, 32) and back.dtype == "float32"
    np.testing.assert_array_equal(back.to_numpy(), arr)


@pytest.mark.parametrize(
    "line",
    [
        {"modality": "hologram", "data": "", "metadata": {}},
        {"modality": "text", "data": "%%%not base64", "metadata": {}},
        {"modality": "audio", "data": "AAAA", "metadata": {}},
        {"modality": "action", "data": "AAAA", "metadata": {"dtype": "float32", "shape": [3, 3]}},
        {"data": "", "metadata": {}},
        ["not", "an", "object"],
    ],
)
def test_malformed_wire_lines_are_refused_with_a_reason(line: object) -> None:
    with pytest.raises(ValueError):
        event_from_wire(line)  # type: ignore[arg-type]


def test_generate_result_round_trips_through_the_json_document() -> None:
    audio = AudioBuffer(np.arange(100, dtype="<i2").tobytes(), 24000)
    res = GenerateResult(
        request_id="abc",
        text="hi there",
        images=[PNG_1x1],
        audio=audio,
        tensors=[TensorChunk.from_numpy(np.zeros((2, 2), np.float32), "latent")],
        finish_reason="length",
        seed=5,
        usage=Usage(3, 4, 4),
    )
    doc = json.loads(json.dumps(res.to_json()))
    assert set(doc["outputs"]) == {"text", "image", "audio", "latent"}
    back = GenerateResult.from_json(doc)
    assert back.text == res.text and back.images == res.images and back.audio == audio
    assert back.tensors[0].shape == (2, 2)
    assert (back.finish_reason, back.seed, back.usage) == ("length", 5, Usage(3, 4, 4))


def test_audio_buffer_writes_a_valid_wav(tmp_path) -> None:  # type: ignore[no-untyped-def]
    buf = AudioBuffer(np.arange(2400, dtype="<i2").tobytes(), 24000)
    assert len(buf) == 2400 and buf.duration == pytest.approx(0.1)
    path = buf.to_wav(tmp_path / "a.wav")
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (24000, 1, 2, 2400)
    with wave.open(io.BytesIO(buf.wav_bytes())) as w:
        assert w.readframes(2400) == buf.pcm
    np.testing.assert_array_equal(buf.to_numpy(), np.arange(2400))


def test_image_chunk_saves_png_bytes_and_reads_its_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    chunk = ImageChunk(PNG_1x1)
    assert (chunk.width, chunk.height) == (1, 1)
    assert chunk.save(tmp_path / "x.png").read_bytes() == PNG_1x1
