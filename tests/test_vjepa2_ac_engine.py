"""V-JEPA 2-AC through the Engine: encode, rollout, action scoring, and typed input errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mstar.engine import Engine
from mstar.errors import InvalidParameterError, InvalidRequestError, MStarError, ShapeError
from mstar.types import GenerateResult, TensorChunk
from tests.fixtures.vjepa2_media import make_mp4, make_png

RNG = np.random.default_rng(0)
STATES = np.concatenate([RNG.normal(size=(2, 6)) * 0.1, [[0.2], [0.3]]], axis=1)  # 2 context frames
ACTIONS = RNG.normal(size=(3, 7)) * 0.05


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine("vjepa2_ac", weights="tiny", device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_mp4(4, 40, 48, seed=7)


def _run(engine: Engine, **kw: Any) -> TensorChunk:
    res = engine.generate(output_modalities=("latent",), **kw)
    assert isinstance(res, GenerateResult) and res.finish_reason == "stop"
    (chunk,) = res.tensors
    assert chunk.modality == "latent" and chunk.dtype == "float32"
    return chunk


def test_encode_returns_normalised_latents_per_frame(engine: Engine, clip: bytes) -> None:
    lat = _run(engine, video=clip, mode="encode").to_numpy()
    assert lat.shape == (4, 4, 64)  # frames, tokens per frame (2x2), width
    np.testing.assert_allclose(lat.mean(-1), 0.0, atol=1e-5)  # layer-normalised, as the planner compares them


def test_rollout_predicts_one_latent_frame_per_action(engine: Engine, clip: bytes) -> None:
    chunk = _run(engine, video=clip, mode="rollout", states=STATES, actions=ACTIONS)
    assert chunk.shape == (3, 4, 64)
    assert chunk.metadata["context_frames"] == 2 and chunk.metadata["tokens_per_frame"] == 4
    states = np.asarray(chunk.metadata["states"])
    assert states.shape == (3, 7)
    np.testing.assert_allclose(states[0, :3], STATES[-1, :3] + ACTIONS[0, :3], atol=1e-6)
    assert np.isfinite(chunk.to_numpy()).all()


def test_rollout_is_deterministic_and_depends_on_the_actions(engine: Engine, clip: bytes) -> None:
    a = _run(engine, video=clip, states=STATES, actions=ACTIONS).to_numpy()
    b = _run(engine, video=clip, states=STATES, actions=ACTIONS).to_numpy()
    c = _run(engine, video=clip, states=STATES, actions=ACTIONS + 0.5).to_numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_score_picks_the_candidate_whose_rollout_reaches_the_goal(engine: Engine, clip: bytes) -> None:
    goal = _run(engine, video=clip, states=STATES, actions=ACTIONS).to_numpy()[-1]
    candidates = np.stack(
        [RNG.normal(size=(3, 7)) * 0.05, RNG.normal(size=(3, 7)) * 0.05, ACTIONS, RNG.normal(size=(3, 7)) * 0.05]
    )
    chunk = _run(engine, video=clip, mode="score", states=STATES, actions=candidates, goal_latent=goal)
    scores = chunk.to_numpy()
    assert scores.shape == (4,)
    assert chunk.metadata["best"] == 2 and chunk.metadata["lower_is_better"] is True
    assert scores[2] < 1e-5 < scores[[0, 1, 3]].min()


def test_score_with_a_goal_image_is_finite_and_deterministic(engine: Engine, clip: bytes) -> None:
    candidates = RNG.normal(size=(5, 2, 7)) * 0.05
    kw = {"video": clip, "images": make_png(30, 50), "mode": "score", "states": STATES[-1], "actions": candidates}
    first, second = _run(engine, **kw).to_numpy(), _run(engine, **kw).to_numpy()
    assert first.shape == (5,) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"states": STATES, "actions": np.zeros((3, 6))}, ShapeError, r"actions must have shape \[T, 7\]"),
        ({"states": np.zeros((2, 8)), "actions": ACTIONS}, ShapeError, r"states must have shape \[C, 7\]"),
        ({"states": np.zeros((5, 7)), "actions": ACTIONS}, ShapeError, r"at least 5 frames"),
        ({"states": STATES, "actions": np.zeros((9, 7))}, ShapeError, r"must be <= 8"),
        ({"states": STATES}, InvalidParameterError, "needs actions"),
        (
            {"states": STATES, "actions": ACTIONS, "extrinsics": np.zeros((2, 6))},
            InvalidParameterError,
            "without camera extrinsics",
        ),
        ({"states": STATES, "actions": [["a"] * 7]}, InvalidParameterError, "numeric array"),
        ({"states": STATES, "actions": np.full((3, 7), np.nan)}, InvalidParameterError, "NaN"),
        ({"mode": "score", "states": STATES, "actions": ACTIONS}, InvalidRequestError, "needs a goal"),
        (
            {"mode": "score", "states": STATES, "actions": ACTIONS, "goal_latent": np.zeros((3, 64))},
            ShapeError,
            r"\[4, 64\]",
        ),
        ({"mode": "plan", "states": STATES, "actions": ACTIONS}, InvalidParameterError, "mode must be one of"),
    ],
)
def test_bad_inputs_are_typed_400_errors(
    engine: Engine, clip: bytes, kwargs: dict[str, Any], error: type[MStarError], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        engine.generate(video=clip, output_modalities=("latent",), **kwargs)
    assert info.value.status_code == 400


def test_a_corrupt_context_clip_is_a_media_error(engine: Engine) -> None:
    from mstar.errors import MediaError

    with pytest.raises(MediaError):
        engine.generate(video=b"\x00\x01garbage", output_modalities=("latent",), states=STATES, actions=ACTIONS)


def test_rollouts_at_the_same_length_share_encoder_and_predictor_forwards(engine: Engine, clip: bytes) -> None:
    runner: Any = engine.runner
    reqs = [
        engine._build_request(
            text=None,
            images=None,
            audio=None,
            video=clip,
            messages=None,
            output_modalities=("latent",),
            input_modalities=None,
            request_id=f"ac-batch-{i}",
            model_kwargs={"states": STATES, "actions": ACTIONS * (i + 1)},
        )
        for i in range(2)
    ]
    for r in reqs:
        assert runner.admit(r)
    activity = runner.activity
    enc0, pred0 = activity.forwards.get("encoder", 0), activity.forwards.get("predictor", 0)
    predictor_rows = []
    for _ in range(3):
        runner.step(reqs)
        predictor_rows.append(activity.last_rows["predictor"] if activity.forwards["predictor"] > pred0 else 0)
        pred0 = activity.forwards["predictor"]
    assert all(r.done for r in reqs)
    assert activity.forwards["encoder"] == enc0 + 1  # both clips' frames in one encoder forward
    assert activity.last_rows["encoder"] == 2 * 2  # 2 context frames of each request
    assert predictor_rows == [2, 2, 2]  # both rollouts advance together, one frame per step
    event = reqs[1].events.get()
    assert isinstance(event, TensorChunk)
    batched = event.to_numpy()
    alone = _run(engine, video=clip, states=STATES, actions=ACTIONS * 2).to_numpy()
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)


def test_a_long_clip_is_encoded_over_several_steps_with_the_same_result(
    engine: Engine, clip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mstar.models.vjepa2 import ac_runner

    whole = _run(engine, video=clip, mode="encode").to_numpy()
    before = engine.stats()["forwards"]["encoder"]
    monkeypatch.setattr(ac_runner, "MAX_FRAMES_PER_ENCODE", 3)
    chunked = _run(engine, video=clip, mode="encode").to_numpy()
    assert engine.stats()["forwards"]["encoder"] - before == 2
    assert engine.stats()["last_rows"]["encoder"] == 1  # 3 of the 4 frames, then the last one
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_an_image_encodes_as_one_frame(engine: Engine) -> None:
    assert _run(engine, images=make_png(20, 36), mode="encode").shape == (1, 4, 64)


def test_the_goal_may_be_the_last_frame_of_a_second_video(engine: Engine, clip: bytes) -> None:
    goal_clip = make_mp4(3, 32, 32, seed=11)
    chunk = _run(engine, video=[clip, goal_clip], mode="score", states=STATES, actions=ACTIONS)
    goal = _run(engine, video=goal_clip, mode="encode").to_numpy()[-1]
    by_latent = _run(engine, video=clip, mode="score", states=STATES, actions=ACTIONS, goal_latent=goal)
    np.testing.assert_allclose(chunk.to_numpy(), by_latent.to_numpy(), rtol=1e-5, atol=1e-6)


def test_a_predictor_trained_with_extrinsics_takes_them(clip: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from mstar.models.vjepa2 import checkpoint

    tiny = checkpoint.AC_CONFIGS["tiny"]
    monkeypatch.setitem(checkpoint.AC_CONFIGS, "tiny", replace(tiny, use_extrinsics=True))
    with Engine("vjepa2_ac", weights="tiny", device="cpu") as eng:
        assert eng.runner.cfg.cond_tokens == 3  # type: ignore[attr-defined]
        ext = RNG.normal(size=(2, 6))
        a = _run(eng, video=clip, states=STATES, actions=ACTIONS, extrinsics=ext).to_numpy()
        b = _run(eng, video=clip, states=STATES, actions=ACTIONS, extrinsics=ext + 1.0).to_numpy()
        assert a.shape == (3, 4, 64) and np.abs(a - b).max() > 1e-4
        with pytest.raises(InvalidParameterError, match=r"extrinsics of shape \[2, 6\]"):
            eng.generate(video=clip, output_modalities=("latent",), states=STATES, actions=ACTIONS)
        with pytest.raises(ShapeError, match=r"extrinsics must have shape \[C, 6\]"):
            eng.generate(
                video=clip, output_modalities=("latent",), states=STATES, actions=ACTIONS, extrinsics=np.zeros((2, 7))
            )
