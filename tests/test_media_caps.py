"""Decompression bombs in every modality are refused quickly and within a bounded memory growth; media
too short for a model gets a 400 naming the minimum.

The bombs are built here: a 217 KiB FLAC of 20 minutes of stereo silence, a 6300x6300 flat RGBA PNG,
a 2000-second 1 fps video, and versions whose headers hide or understate their length. Memory is
measured in a fresh subprocess (the peak RSS of the decode, reset just before it), so the figure is
the decode's own. docs/reliability.md ("Media caps") records the bound and the figures.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from mstar.errors import (
    InvalidParameterError,
    InvalidRequestError,
    MediaError,
    MediaTooLargeError,
    PayloadTooLargeError,
)
from mstar.media import MediaItem, _resample, decode_audio, decode_image, decode_video, normalize_media
from mstar.media_limits import DEFAULT_LIMITS, MediaLimits
from tests.helpers.media import make_mp4, make_wav

#: The peak RSS growth a refused bomb may cost (docs/reliability.md states it).
BOUND_MIB = 200
#: A bomb is refused within this many seconds (on the shared 2-core test machine).
QUICK_S = 5.0


# --------------------------------------------------------------------------- the bombs


def silent_flac(minutes: float = 20, rate: int = 48000, channels: int = 2) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((rate * 60, channels), np.int16)
        for _ in range(int(minutes)):
            f.write(block)
    return buf.getvalue()


def without_length(flac: bytes) -> bytes:
    """The FLAC with its STREAMINFO total-samples field zeroed: the header no longer says how long it is."""
    data = bytearray(flac)
    at = 8 + 10  # "fLaC", the block header, then 10 bytes before the 64 bits that end in total samples
    value = int.from_bytes(data[at : at + 8], "big") & ~((1 << 36) - 1)
    data[at : at + 8] = value.to_bytes(8, "big")
    return bytes(data)


def flat_rgba_png(side: int = 6300) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (40, 90, 160, 128)).save(buf, format="PNG")
    return buf.getvalue()


def long_video(frames: int = 2000, fps: int = 1, side: int = 64) -> bytes:
    """A low-bitrate Matroska clip: ``frames`` flat frames at ``fps`` (Matroska states no frame count)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as container:
        stream: Any = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
        for _ in range(frames):
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def lying_duration(mkv: bytes, seconds: float = 1.0) -> bytes:
    """The clip with its Matroska Duration element (ms, 8-byte float) rewritten to ``seconds``."""
    at = mkv.index(b"\x44\x89\x88")  # Duration, size 8
    return mkv[: at + 3] + struct.pack(">d", seconds * 1000) + mkv[at + 11 :]


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    clip = long_video()
    flac = silent_flac()
    return {
        "silence.flac": flac,
        "silence_nolength.flac": without_length(flac),
        "flat.png": flat_rgba_png(),
        "long.mkv": clip,
        "lying.mkv": lying_duration(clip),
    }


# --------------------------------------------------------------------------- measuring a decode in a fresh process

_MEASURE = r"""
import json, sys, time
from pathlib import Path
from mstar.media import MediaItem, decode_audio, decode_image, decode_video
from mstar.media_limits import MediaLimits
from tests.helpers.media import make_mp4, make_png, make_wav

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

modality, path, limits = sys.argv[1], Path(sys.argv[2]), MediaLimits(**json.loads(sys.argv[3]))
decode = {"image": decode_image, "audio": lambda item: decode_audio(item, sample_rate=16000), "video": decode_video}
for warm in (MediaItem("w.png", make_png(), "image"), MediaItem("w.wav", make_wav(), "audio"),
             MediaItem("w.mp4", make_mp4(), "video")):  # codecs and numpy paths loaded before measuring
    decode[warm.modality](warm)
item = MediaItem(path.name, path.read_bytes(), modality, limits)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
base = status("VmRSS")
start = time.perf_counter()
try:
    decode[modality](item)
    out = {"error": None}
except Exception as exc:
    out = {"error": type(exc).__name__, "message": str(exc), "status": getattr(exc, "status_code", None)}
out["seconds"] = time.perf_counter() - start
out["growth_mib"] = status("VmHWM") - base
print(json.dumps(out))
"""


def measure(tmp_path: Path, modality: str, name: str, data: bytes, **limits: Any) -> dict[str, Any]:
    """Decode ``data`` in a fresh interpreter: the outcome, its time and its peak RSS growth (MiB)."""
    path = tmp_path / name
    path.write_bytes(data)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, modality, str(path), json.dumps(limits)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(name, result)  # the figures docs/reliability.md records (pytest -s shows them)
    return result


def assert_refused(result: dict[str, Any], message: str) -> None:
    assert result["error"] == "MediaTooLargeError" and result["status"] == 413, result
    assert message in result["message"], result
    assert result["seconds"] < QUICK_S, result
    assert result["growth_mib"] < BOUND_MIB, result


# --------------------------------------------------------------------------- bombs, one modality at a time


@pytest.mark.slow
def test_a_20_minute_silent_flac_is_refused_from_its_header(tmp_path: Path, bombs: dict[str, bytes]) -> None:
    assert len(bombs["silence.flac"]) < 300 * 1024
    result = measure(tmp_path, "audio", "silence.flac", bombs["silence.flac"])
    assert_refused(result, "is 1200.0 s long; the limit is 300 s (--max-audio-seconds)")


@pytest.mark.slow
def test_a_flac_that_hides_its_length_is_stopped_at_the_cap_while_decoding(tmp_path: Path, bombs: dict[str, bytes]) -> None:
    result = measure(tmp_path, "audio", "silence.flac", bombs["silence_nolength.flac"])
    assert_refused(result, "is at least 30")
    assert "the limit is 300 s" in result["message"]


@pytest.mark.slow
def test_a_6300x6300_rgba_png_is_refused_from_its_header(tmp_path: Path, bombs: dict[str, bytes]) -> None:
    assert len(bombs["flat.png"]) < 300 * 1024
    result = measure(tmp_path, "image", "flat.png", bombs["flat.png"])
    assert_refused(result, "is 6300x6300 (39690000 pixels); the limit is 16777216 pixels (--max-image-pixels)")


@pytest.mark.slow
def test_a_long_low_bitrate_video_is_refused_from_its_header(tmp_path: Path, bombs: dict[str, bytes]) -> None:
    result = measure(tmp_path, "video", "long.mkv", bombs["long.mkv"])
    assert_refused(result, "is 2000.0 s long; the limit is 600 s (--max-video-seconds)")


@pytest.mark.slow
def test_a_video_whose_header_lies_is_stopped_while_decoding(tmp_path: Path, bombs: dict[str, bytes]) -> None:
    result = measure(tmp_path, "video", "lying.mkv", bombs["lying.mkv"])
    assert_refused(result, "is at least 60")  # its frames' own timestamps pass 600 s
    assert "the limit is 600 s" in result["message"]


@pytest.mark.slow
def test_frames_past_the_frame_cap_stop_decoding(tmp_path: Path) -> None:
    result = measure(tmp_path, "video", "many.mkv", long_video(frames=300, fps=25, side=32), max_video_frames=100)
    assert_refused(result, "has at least 101 frames; the limit is 100 frames (--max-video-frames)")


@pytest.mark.slow
def test_decoded_bytes_past_the_byte_cap_stop_decoding(tmp_path: Path) -> None:
    result = measure(tmp_path, "video", "big.mkv", long_video(frames=100, fps=25, side=256), max_decoded_mb=2)
    assert_refused(result, "the limit is 2 MiB (--max-decoded-mb)")


# --------------------------------------------------------------------------- the caps themselves (fast)


def test_an_image_past_either_pixel_cap_is_refused_before_decoding() -> None:
    png = flat_rgba_png(16)
    with pytest.raises(MediaTooLargeError, match=r"16x16 \(256 pixels\); the limit is 100 pixels"):
        decode_image(MediaItem("a.png", png, "image", MediaLimits(max_image_pixels=100)))
    with pytest.raises(MediaTooLargeError, match="the longest side may be 8 pixels"):
        decode_image(MediaItem("a.png", png, "image", MediaLimits(max_image_side=8)))


def test_a_cap_over_the_limit_is_a_413_media_error() -> None:
    err = MediaTooLargeError("x")
    assert isinstance(err, MediaError) and isinstance(err, PayloadTooLargeError)
    assert (err.status_code, err.code) == (413, "media_too_large")


def test_audio_past_the_duration_cap_names_it() -> None:
    item = MediaItem("a.wav", make_wav(0.5), "audio", MediaLimits(max_audio_seconds=0.25))
    with pytest.raises(MediaTooLargeError, match=r"audio 'a.wav' is 0.5 s long; the limit is 0.25 s"):
        decode_audio(item)


def test_a_video_past_the_frame_size_cap_is_refused_from_its_header() -> None:
    item = MediaItem("v.mp4", make_mp4(frames=2, w=64, h=64), "video", MediaLimits(max_image_pixels=1000))
    with pytest.raises(MediaTooLargeError, match="frame is 64x64"):
        decode_video(item)


def test_media_limits_must_be_positive() -> None:
    with pytest.raises(InvalidParameterError, match="max_video_frames"):
        MediaLimits(max_video_frames=0)
    with pytest.raises(InvalidParameterError, match="max_audio_seconds"):
        MediaLimits(max_audio_seconds=-1.0)


def test_normalize_media_gives_every_item_the_engines_limits() -> None:
    limits = MediaLimits(max_image_pixels=10)
    items = normalize_media([b"\x89PNG", MediaItem("a.png", b"", "image")], "image", limits=limits)
    assert all(item.limits is limits for item in items)
    assert normalize_media(b"x", "image")[0].limits is DEFAULT_LIMITS


def test_media_within_the_caps_decodes_as_before() -> None:
    frames, fps = decode_video(MediaItem("v.mp4", make_mp4(frames=5), "video"))
    assert frames.shape == (5, 32, 32, 3) and frames.flags.writeable and fps == 8.0
    assert decode_video(MediaItem("v.mp4", make_mp4(frames=5), "video"), max_frames=3)[0].shape[0] == 3


def test_chunked_resampling_matches_one_interpolation_over_the_whole_clip() -> None:
    x = np.random.default_rng(0).standard_normal(3 * 2**20 + 17).astype(np.float32)
    ours = _resample(x, 48000, 16000)
    k = 3
    smooth = np.convolve(x, np.ones(k, dtype=np.float32) / k, mode="same")
    n_out = int(round(x.shape[0] * 16000 / 48000))
    t_in, t_out = np.arange(x.shape[0], dtype=np.float64) / 48000, np.arange(n_out, dtype=np.float64) / 16000
    assert np.array_equal(ours, np.interp(t_out, t_in, smooth).astype(np.float32))


# --------------------------------------------------------------------------- no float copy of a large original


def test_transparent_pixels_are_composited_in_uint8_as_the_float_formula_rounds() -> None:
    from PIL import Image

    rgba = np.random.default_rng(1).integers(0, 256, (40, 30, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    ours = decode_image(MediaItem("a.png", buf.getvalue(), "image"), background=(255, 255, 255))
    f = rgba.astype(np.float32)
    alpha = f[..., 3:] / 255.0
    assert np.array_equal(ours, (f[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8))


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resizing_in_strips_matches_resizing_at_once(antialias: bool, channels_last: bool) -> None:
    import torch
    import torch.nn.functional as F

    from mstar.models.resize import resize_bilinear

    rgb = np.random.default_rng(2).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    x = x if channels_last else x.contiguous()
    whole = F.interpolate(x.float() / 255.0, size=(224, 170), mode="bilinear", align_corners=False, antialias=antialias)
    strips = resize_bilinear(x, (224, 170), antialias=antialias, divide=255.0, budget=256 * 1024)
    assert torch.equal(whole, strips)


# --------------------------------------------------------------------------- too-short media


def test_qwen3_omni_features_name_the_shortest_clip() -> None:
    from mstar.models.qwen3_omni.processor import AUDIO_MIN_SAMPLES, audio_features

    with pytest.raises(MediaError, match=r"is 10.0 ms long \(160 samples at 16 kHz\); Qwen3-Omni needs at least 12.6 ms"):
        audio_features(np.zeros(160, np.float32))
    assert audio_features(np.zeros(AUDIO_MIN_SAMPLES, np.float32)).num_tokens == 1


@pytest.mark.slow
def test_too_short_media_is_refused_naming_the_minimum_for_each_model(shared_engine: Any) -> None:
    from tests.helpers.media import make_png

    qwen = shared_engine("qwen3_omni")
    with pytest.raises(MediaError, match="Qwen3-Omni needs at least 12.6 ms") as info:
        qwen.generate(text="hear", audio=("tick.wav", make_wav(0.01)), max_output_tokens=1)
    assert info.value.status_code == 400
    assert qwen.generate(text="hear", audio=("ok.wav", make_wav(0.0126)), max_output_tokens=1).text is not None
    with pytest.raises(MediaError, match="holds no samples"):
        qwen.generate(text="hear", audio=("empty.wav", make_wav(0.0)), max_output_tokens=1)
    with pytest.raises(MediaError, match="BAGEL needs both sides at least 2 pixels"):
        shared_engine("bagel").generate(text="what", images=make_png(1, 1), max_output_tokens=1)
    with pytest.raises(InvalidRequestError, match="at least 2 frames"):
        shared_engine("vjepa2").generate(video=("one.mp4", make_mp4(frames=1)), output_modalities=["latent"])
    with pytest.raises(InvalidRequestError, match=">= 14 px"):
        shared_engine("pi05").generate(text="t", images=make_png(8, 8), robot_state=[0.1, 0.2],
                                       output_modalities=["action"])


# --------------------------------------------------------------------------- the same over HTTP


def _post(url: str, name: str, data: bytes) -> requests.Response:
    files: list[tuple[str, Any]] = [("text", (None, "look")), ("streaming", (None, "false")),
                                    ("files", (name, data, "application/octet-stream"))]
    return requests.post(url + "/generate", files=files, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("name, limit", [
    ("flat.png", "the limit is 16777216 pixels (--max-image-pixels)"),
    ("silence.flac", "the limit is 300 s (--max-audio-seconds)"),
    ("long.mkv", "the limit is 600 s (--max-video-seconds)"),
])
def test_the_server_answers_413_naming_the_cap(served: Any, bombs: dict[str, bytes], name: str, limit: str) -> None:
    resp = _post(served("fake_media").url, name, bombs[name])
    assert resp.status_code == 413, resp.text
    err = resp.json()["error"]
    assert err["code"] == "media_too_large" and limit in err["message"]


def test_the_engines_limits_reach_the_decoder(fake_models: Any) -> None:
    import mstar
    from mstar.server import create_app
    from tests.helpers.servers import ServerThread

    limits = MediaLimits(max_audio_seconds=0.1)
    with mstar.Engine("fake_media", weights="tiny", device="cpu", media_limits=limits) as engine:
        with pytest.raises(MediaTooLargeError, match="the limit is 0.1 s"):
            engine.generate(text="hear", audio=make_wav(0.25))
        with ServerThread(create_app(engine)) as server:
            resp = _post(server.url, "a.wav", make_wav(0.25))
    assert resp.status_code == 413 and "the limit is 0.1 s (--max-audio-seconds)" in resp.json()["error"]["message"]


def test_the_server_flags_build_the_limits() -> None:
    from mstar.server.cli import build_parser, media_limits

    args = build_parser().parse_args(["--model", "fake", "--max-image-pixels", "1000", "--max-audio-seconds", "2.5"])
    limits = media_limits(args)
    assert (limits.max_image_pixels, limits.max_audio_seconds) == (1000, 2.5)
    assert limits.max_video_frames == DEFAULT_LIMITS.max_video_frames
