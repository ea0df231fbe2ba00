"""Pi0.5 through the Engine (tiny weights): action chunks, seeds, batching across clients, validation."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mstar.engine import Engine
from mstar.errors import (
    EmptyInputError,
    InvalidParameterError,
    InvalidRequestError,
    MediaError,
    ShapeError,
    UnsupportedModalityError,
)
from mstar.media import MediaArg
from mstar.models.pi05.runner import Pi05Runner
from mstar.request import Request, RequestInputs
from mstar.types import Finished, GenerateResult, Progress, TensorChunk


def _png(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


CAMS: list[MediaArg] = [_png(224, 224, 0), _png(320, 240, 1)]
STATE = [0.1, -0.5, 0.3, 0.9]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine("pi05", weights="tiny", device="cpu")
    yield eng
    eng.close()


def _act(engine: Engine, **kw: Any) -> np.ndarray:
    args: dict[str, Any] = {"text": "pick up the red cube", "images": CAMS, "robot_state": STATE, "seed": 1}
    args.update(kw)
    res = engine.generate(output_modalities=("action",), **args)
    assert isinstance(res, GenerateResult) and res.finish_reason == "stop"
    assert len(res.tensors) == 1
    return res.tensors[0].to_numpy()


def test_generate_returns_an_action_chunk_of_horizon_by_32_float32(engine: Engine) -> None:
    res = engine.generate(
        text="pick up the cube",
        images=CAMS,
        robot_state=STATE,
        output_modalities=("action",),
        action_horizon=12,
        seed=0,
    )
    assert isinstance(res, GenerateResult)
    chunk = res.tensors[0]
    assert isinstance(chunk, TensorChunk) and chunk.modality == "action"
    arr = chunk.to_numpy()
    assert arr.shape == (12, 32) and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert chunk.metadata["action_horizon"] == 12 and chunk.metadata["num_steps"] == 10


def test_default_horizon_is_the_full_chunk_of_50(engine: Engine) -> None:
    assert _act(engine).shape == (50, 32)


def test_same_seed_gives_the_same_actions_and_other_seeds_differ(engine: Engine) -> None:
    a, b, c = _act(engine, seed=5), _act(engine, seed=5), _act(engine, seed=6)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_actions_depend_on_state_text_and_images(engine: Engine) -> None:
    base = _act(engine)
    assert np.abs(base - _act(engine, robot_state=[0.9, -0.5, 0.3, 0.9])).max() > 1e-4
    assert np.abs(base - _act(engine, text="open the drawer")).max() > 1e-4
    assert np.abs(base - _act(engine, images=CAMS[:1])).max() > 1e-4


def test_a_shorter_horizon_is_a_prefix_of_the_full_chunk(engine: Engine) -> None:
    np.testing.assert_array_equal(_act(engine, action_horizon=5), _act(engine)[:5])


def test_stream_reports_one_progress_event_per_euler_step(engine: Engine) -> None:
    events = list(
        engine.stream(text="t", images=CAMS[:1], robot_state=[0.0], output_modalities=("action",), num_steps=3)
    )
    assert [(e.step, e.total) for e in events if isinstance(e, Progress)] == [(1, 3), (2, 3), (3, 3)]
    assert sum(isinstance(e, TensorChunk) for e in events) == 1


def test_the_euler_loop_integrates_the_expert_velocity_from_seeded_noise() -> None:
    # With the expert replaced by v = x * t, two steps give 0.375 * noise (see test_pi05_flow).
    eng = Engine("pi05", weights="tiny", device="cpu")
    try:
        runner: Any = eng.runner
        runner.model.velocity = lambda x, t, cache, slots: x * t[:, None, None]
        out = _act(eng, seed=11, num_steps=2)
    finally:
        eng.close()
    noise = torch.randn((50, 32), generator=torch.Generator().manual_seed(11))
    np.testing.assert_allclose(out, 0.375 * noise.numpy(), rtol=1e-6, atol=1e-6)


def _request(engine: Engine, rid: str, seed: int, images: list[MediaArg], state: list[float], text: str) -> Request:
    from mstar.media import normalize_media

    inputs = RequestInputs(text=text, images=normalize_media(images, "image"))
    params = engine.runner.validate(inputs, ("action",), {"robot_state": state})
    prepared = engine.runner.prepare(inputs, ("action",), params)
    return Request(
        rid,
        inputs,
        input_modalities=("text", "image"),
        output_modalities=("action",),
        params=params,
        prepared=prepared,
        seed=seed,
    )


def _drive(engine: Engine, reqs: list[Request]) -> list[np.ndarray]:
    runner = engine.runner
    for r in reqs:
        assert runner.admit(r)
    while not all(r.done for r in reqs):
        runner.step([r for r in reqs if not r.done])
    out = []
    for r in reqs:
        runner.release(r)
        events = []
        while not r.events.empty():
            events.append(r.events.get())
        out.append(next(e for e in events if isinstance(e, TensorChunk)).to_numpy())
    return out


def test_two_requests_share_each_batched_euler_step_and_match_their_solo_runs(engine: Engine) -> None:
    # Different cameras and prompts give prefixes of different lengths: padding must not leak.
    specs = [("a", 3, CAMS, STATE, "stack the blocks"), ("b", 4, CAMS[:1], [0.2, 0.4], "wipe the table, carefully")]
    solo = [_drive(engine, [_request(engine, *s)])[0] for s in specs]
    activity = engine.runner.activity
    forwards, rows = dict(activity.forwards), dict(activity.rows)
    together = _drive(engine, [_request(engine, *s) for s in specs])
    assert activity.forwards["prefill"] - forwards["prefill"] == 1
    assert activity.rows["prefill"] - rows["prefill"] == 2  # both prefixes in that one batch
    assert activity.forwards["denoise"] - forwards["denoise"] == 10  # not 20: each Euler step ran both
    assert activity.rows["denoise"] - rows["denoise"] == 20
    for alone, batched in zip(solo, together, strict=True):
        np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=1e-4)


def test_concurrent_engine_requests_join_the_same_denoise_batches(engine: Engine) -> None:
    alone = [_act(engine, seed=21), _act(engine, seed=22, images=CAMS[:1])]
    submitted = threading.Event()

    def hold(req: Request) -> None:  # hold the loop's first step until both requests are queued
        submitted.wait(10)

    engine.scheduler.fault_hook = hold
    before = engine.stats()
    try:
        s1 = engine.stream(
            text="pick up the red cube", images=CAMS, robot_state=STATE, seed=21, output_modalities=("action",)
        )
        s2 = engine.stream(
            text="pick up the red cube", images=CAMS[:1], robot_state=STATE, seed=22, output_modalities=("action",)
        )
        submitted.set()
        got = [next(e for e in s if isinstance(e, TensorChunk)).to_numpy() for s in (s1, s2)]
    finally:
        engine.scheduler.fault_hook = None
    after = engine.stats()
    calls = after["forwards"]["denoise"] - before["forwards"]["denoise"]
    rows = after["rows"]["denoise"] - before["rows"]["denoise"]
    # Each call denoises at least one row, so more rows than calls means some call denoised both requests.
    assert rows > calls
    for a, b in zip(alone, got, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def test_kv_slots_and_lengths_come_from_the_engine_sizing() -> None:
    with Engine("pi05", weights="tiny", device="cpu") as default:
        stats = default.stats()
        # Defaults: 8 slots for the tiny variant, each as long as 3 cameras + the prompt budget + one chunk.
        assert stats["kv_slots_total"] == 8 and default.runner.sizing.max_seq_len == 3 * 256 + 200 + 50
        assert default.scheduler.max_active == 8
    with Engine("pi05", weights="tiny", device="cpu", max_batch_size=2, max_seq_len=400) as small:
        runner: Any = small.runner
        assert small.stats()["kv_slots_total"] == 2 and runner.cache.max_len == 400
        assert small.stats()["kv_bytes"] < stats["kv_bytes"]
        assert _act(small, images=CAMS[:1]).shape == (50, 32)  # 256 image + ~40 prompt + 50 action positions fit
        with pytest.raises(InvalidRequestError, match=r"needs \d+ KV positions.*max_seq_len=400") as info:
            _act(small, images=CAMS)
        assert info.value.status_code == 400


def test_kv_slots_are_released_when_requests_finish(engine: Engine) -> None:
    _act(engine)
    deadline = time.monotonic() + 5
    while engine.stats()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the loop releases a request just after its last event
    assert engine.stats()["kv_slots_used"] == 0


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("images", [None, [], CAMS * 2])
def test_camera_count_outside_one_to_three_is_a_shape_error(engine: Engine, images: list[bytes] | None) -> None:
    with pytest.raises(ShapeError, match="1 to 3 camera images") as info:
        _act(engine, images=images)
    assert info.value.status_code == 400 and info.value.param == "images"


def test_images_of_any_size_are_resized_but_a_sliver_is_refused(engine: Engine) -> None:
    assert _act(engine, images=[_png(64, 480)]).shape == (50, 32)
    with pytest.raises(ShapeError, match=r"\[H, W, 3\].*224x224"):
        _act(engine, images=[_png(640, 4)])


def test_a_corrupt_image_is_a_media_error(engine: Engine) -> None:
    with pytest.raises(MediaError):
        _act(engine, images=[("cam.png", b"not a png")])


@pytest.mark.parametrize("state", [[0.0] * 33, []])
def test_state_of_the_wrong_dimension_is_a_shape_error_naming_the_shape(engine: Engine, state: list[float]) -> None:
    with pytest.raises(ShapeError, match=r"\(d,\) with 1 <= d <= 32"):
        _act(engine, robot_state=state)


def test_missing_state_is_a_shape_error(engine: Engine) -> None:
    with pytest.raises(ShapeError, match="robot_state"):
        engine.generate(text="t", images=CAMS, output_modalities=("action",))


@pytest.mark.parametrize("state", [[0.1, float("nan")], [0.1, "a"], [[0.1, 0.2]], [True], "0.1"])
def test_state_that_is_not_a_list_of_finite_floats_is_invalid(engine: Engine, state: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        _act(engine, robot_state=state)
    assert info.value.param == "robot_state" and info.value.status_code == 400


@pytest.mark.parametrize("horizon", [0, 51, -3])
def test_action_horizon_out_of_range_is_invalid(engine: Engine, horizon: int) -> None:
    with pytest.raises(InvalidParameterError, match=r"between 1 and 50.*\(action_horizon, 32\)"):
        _act(engine, action_horizon=horizon)


def test_num_steps_out_of_range_is_invalid(engine: Engine) -> None:
    with pytest.raises(InvalidParameterError):
        _act(engine, num_steps=0)


def test_missing_task_text_is_refused(engine: Engine) -> None:
    with pytest.raises(EmptyInputError):
        engine.generate(images=CAMS, robot_state=STATE, output_modalities=("action",))


def test_pi05_produces_only_actions(engine: Engine) -> None:
    with pytest.raises(UnsupportedModalityError):
        engine.generate(text="t", images=CAMS, robot_state=STATE, output_modalities=("text",))


def test_an_overlong_prompt_is_refused_with_the_token_budget(engine: Engine) -> None:
    with pytest.raises(InvalidParameterError, match="at most 200"):
        _act(engine, text="x" * 400)


def test_cancel_mid_denoising_ends_the_request_and_frees_its_slot(engine: Engine) -> None:
    stream = engine.stream(text="t", images=CAMS[:1], robot_state=[0.0], output_modalities=("action",), num_steps=1000)
    first = next(iter(stream))
    assert isinstance(first, Progress)
    assert engine.cancel(stream.request_id)
    rest = list(stream)
    last = rest[-1]
    assert (
        isinstance(last, Finished)
        and last.finish_reason == "cancelled"
        and not any(isinstance(e, TensorChunk) for e in rest)
    )
    deadline = time.monotonic() + 5
    while engine.stats()["kv_slots_used"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["kv_slots_used"] == 0


def test_a_request_waits_for_a_kv_slot_when_all_are_taken(engine: Engine) -> None:
    runner = engine.runner
    assert isinstance(runner, Pi05Runner)
    held = [_request(engine, f"hold{i}", i, CAMS[:1], [0.0], "t") for i in range(runner.cache.slots_free)]
    try:
        assert all(runner.admit(r) for r in held)
        assert not runner.admit(_request(engine, "late", 0, CAMS[:1], [0.0], "t"))
    finally:
        for r in held:
            runner.release(r)
    assert runner.cache.slots_used == 0
