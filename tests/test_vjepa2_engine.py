"""V-JEPA 2 through the Engine: latents of the advertised shape, batching, and typed input errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from mstar.engine import Engine
from mstar.errors import InvalidRequestError, MediaError, ShapeError
from mstar.media import decode_video, normalize_media
from mstar.models.vjepa2.preprocess import normalize, resize_center_crop
from mstar.types import GenerateResult, TensorChunk
from tests.fixtures.vjepa2_media import make_mp4


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine("vjepa2", weights="tiny", device="cpu")
    yield eng
    eng.close()


def _latent(engine: Engine, video: bytes, **kw: Any) -> np.ndarray:
    res = engine.generate(video=video, output_modalities=("latent",), **kw)
    assert isinstance(res, GenerateResult) and res.finish_reason == "stop"
    (chunk,) = res.tensors
    assert chunk.modality == "latent" and chunk.dtype == "float32"
    return chunk.to_numpy()


def test_generate_returns_latents_of_the_advertised_shape(engine: Engine) -> None:
    res = engine.generate(video=make_mp4(8, 32, 32), output_modalities=("latent",))
    assert isinstance(res, GenerateResult)
    (chunk,) = res.tensors
    cfg = engine.runner.cfg  # type: ignore[attr-defined]
    # 8 frames -> 4 tubelets of 2x2 patches (32 px crop, 16 px patches)
    assert chunk.shape == (4 * cfg.tokens_per_tubelet, cfg.hidden_size) == (16, 64)
    assert chunk.metadata["grid"] == [4, 2, 2] and chunk.metadata["frames"] == 8
    assert np.isfinite(chunk.to_numpy()).all()


def test_latents_are_the_encoder_output_of_the_preprocessed_clip(engine: Engine) -> None:
    video = make_mp4(4, 48, 40, seed=3)
    frames, _ = decode_video(normalize_media(video, "video")[0])
    clip = normalize(resize_center_crop(frames, 32, int(32 * 256 / 224)), torch.float32)
    with torch.no_grad():
        expected = engine.runner.model(clip[None])[0].numpy()  # type: ignore[attr-defined]
    np.testing.assert_allclose(_latent(engine, video), expected, rtol=1e-5, atol=1e-5)


def test_num_frames_and_frame_step_pick_the_frames(engine: Engine) -> None:
    video = make_mp4(8, 32, 32, seed=4)
    assert _latent(engine, video, num_frames=4).shape == (8, 64)
    assert _latent(engine, video).shape == (16, 64)  # unset: the whole clip (shorter than frames_per_clip)
    assert _latent(engine, video, frame_step=2).shape == (8, 64)  # 4 of the 8 frames


def test_same_shape_clips_share_one_forward(engine: Engine) -> None:
    runner = engine.runner
    reqs = [
        engine._build_request(
            text=None,
            images=None,
            audio=None,
            video=make_mp4(n, 32, 32, seed=n + i),
            messages=None,
            output_modalities=("latent",),
            input_modalities=None,
            request_id=f"batch-{i}",
            model_kwargs={},
        )
        for i, n in enumerate((4, 6, 4))
    ]
    for r in reqs:
        assert runner.admit(r)
    forwards = runner.activity.forwards.get("encoder", 0)
    runner.step(reqs)
    assert runner.activity.forwards["encoder"] - forwards == 1  # one forward ...
    assert runner.activity.last_rows["encoder"] == 2  # ... over both 4-frame clips
    assert [r.done for r in reqs] == [True, False, True]
    runner.step([reqs[1]])
    assert reqs[1].done
    assert runner.activity.forwards["encoder"] - forwards == 2 and runner.activity.last_rows["encoder"] == 1
    assert engine.stats()["forwards"]["encoder"] == runner.activity.forwards["encoder"]
    event = reqs[0].events.get()
    assert isinstance(event, TensorChunk)
    batched = event.to_numpy()
    alone = _latent(engine, reqs[0].inputs.video[0].data)
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)


def test_a_single_frame_video_is_a_shape_error(engine: Engine) -> None:
    with pytest.raises(ShapeError, match=r"at least 2 frames") as info:
        engine.generate(video=make_mp4(1, 32, 32), output_modalities=("latent",))
    assert info.value.status_code == 400


def test_a_corrupt_video_is_a_media_error(engine: Engine) -> None:
    good = make_mp4(4, 32, 32)
    with pytest.raises(MediaError) as info:
        engine.generate(video=("clip.mp4", good[: len(good) // 3] + b"\x00" * 64), output_modalities=("latent",))
    assert info.value.status_code == 400
    with pytest.raises(MediaError):
        engine.generate(video=b"not a video at all", output_modalities=("latent",))


def test_any_frame_size_is_resized_to_the_crop(engine: Engine) -> None:
    assert _latent(engine, make_mp4(2, 24, 64)).shape == (4, 64)


def test_two_videos_in_one_request_are_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="exactly one video"):
        engine.generate(video=[make_mp4(2), make_mp4(2)], output_modalities=("latent",))
