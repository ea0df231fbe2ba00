"""The Engine's contract, checked on the fake model: validation, streaming, cancel, isolation."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

import mstar
import tests.fake_model  # noqa: F401  (registers "fake")
from mstar import errors
from mstar.engine import Engine, EventStream
from mstar.types import AudioChunk, Finished, GenerateResult, TextChunk


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine("fake") as eng:
        yield eng


def _wait_idle(engine: Engine, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["inflight"] == 0 and stats["kv_slots_used"] == 0:
            return stats
        time.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {engine.stats()}")


def test_import_mstar_and_client_do_not_import_torch() -> None:
    code = (
        "import sys, mstar; from mstar import errors, types, GenerateResult; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_list_models_reports_capabilities() -> None:
    info = {m.name: m for m in mstar.list_models()}
    assert "orpheus" in info and info["orpheus"].output_modalities == ("audio",)


def test_unknown_model_lists_the_available_ones() -> None:
    with pytest.raises(errors.UnknownModelError, match="available models: .*orpheus"):
        Engine("no-such-model")


def test_generate_returns_a_result_with_effective_seed_and_usage(engine: Engine) -> None:
    res = engine.generate(text="hey", seed=11)
    assert isinstance(res, GenerateResult)
    assert res.text == "hey" and res.finish_reason == "stop" and res.seed == 11
    assert res.usage.output_tokens == 3


def test_seed_is_derived_from_the_request_id_when_not_given(engine: Engine) -> None:
    a = engine.generate(text="x", request_id="same-id")
    b = engine.generate(text="x", request_id="same-id")
    assert a.seed == b.seed is not None


def test_stream_yields_events_and_ends_with_finished(engine: Engine) -> None:
    events = list(engine.stream(text="ab", output_modalities=("text", "audio")))
    assert isinstance(events[-1], Finished)
    assert any(isinstance(e, AudioChunk) for e in events[:-1])
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == "ab"


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"text": "x", "bogus": 1}, errors.UnknownParameterError, "accepted: max_output_tokens, seed"),
        ({"text": "x", "output_modalities": ("image",)}, errors.UnsupportedModalityError, "cannot produce image"),
        ({"text": "   "}, errors.EmptyInputError, "no input"),
        ({}, errors.EmptyInputError, "no input"),
        ({"text": "x", "max_output_tokens": "many"}, errors.InvalidParameterError, "max_output_tokens must be"),
        ({"text": "x", "max_output_tokens": -1}, errors.InvalidParameterError, ">= 1"),
        ({"text": "x", "seed": "abc"}, errors.InvalidParameterError, "seed must be an integer"),
        ({"text": "x", "video": b"\x00"}, errors.UnsupportedModalityError, "does not accept video"),
        ({"text": "x", "images": 12}, errors.MediaError, "must be a path, bytes"),
        ({"text": "x", "images": "/no/such/file.png"}, errors.MediaError, "not found"),
        ({"text": "x", "input_modalities": "image"}, errors.InvalidRequestError, "no such input"),
        ({"text": "bad \ud800 text"}, errors.InvalidRequestError, "lone surrogate"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, errors.InvalidRequestError, "lone surrogate"),
    ],
)
def test_bad_input_raises_a_typed_error_naming_the_problem(engine: Engine, kwargs: dict, exc: type, message: str) -> None:
    with pytest.raises(exc, match=message) as info:
        engine.generate(**kwargs)
    assert 400 <= info.value.status_code < 500


def test_leaving_a_stream_early_cancels_the_request(engine: Engine) -> None:
    stream = engine.stream(text="abcdef", max_output_tokens=100000, step_delay=0.001)
    assert isinstance(stream, EventStream)
    next(stream)
    stream.close()
    _wait_idle(engine)
    assert not engine.scheduler.is_inflight(stream.request_id)


def test_cancel_by_id_finishes_with_cancelled_within_one_step(engine: Engine) -> None:
    stream = engine.stream(text="abc", max_output_tokens=100000, step_delay=0.001, request_id="to-cancel")
    next(stream)
    assert engine.cancel("to-cancel")
    events = list(stream)
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "cancelled"
    steps, _seconds = engine.stats()["cancel_latencies"][-1]
    assert steps <= 1


def test_cancel_that_arrives_before_the_request_still_applies(engine: Engine) -> None:
    assert engine.cancel("early-bird") is False
    res = engine.generate(text="abc", max_output_tokens=100000, request_id="early-bird")
    assert res.finish_reason == "cancelled"


def test_cancel_without_an_id_is_refused(engine: Engine) -> None:
    with pytest.raises(errors.InvalidRequestError):
        engine.cancel("")


def test_duplicate_in_flight_request_id_is_a_conflict(engine: Engine) -> None:
    stream = engine.stream(text="abc", max_output_tokens=100000, step_delay=0.001, request_id="dup")
    try:
        with pytest.raises(errors.ConflictError, match="already in flight"):
            engine.generate(text="x", request_id="dup")
    finally:
        stream.close()
    _wait_idle(engine)


def test_timeout_finishes_with_timeout(engine: Engine) -> None:
    res = engine.generate(text="abc", max_output_tokens=100000, step_delay=0.01, timeout=0.1)
    assert res.finish_reason == "timeout"


def test_a_failing_request_fails_alone_and_the_engine_keeps_serving(engine: Engine) -> None:
    def hook(req) -> None:  # type: ignore[no-untyped-def]
        if req.request_id == "bad" and req.steps >= 2:
            raise RuntimeError("injected fault")

    engine.scheduler.fault_hook = hook
    try:
        good = engine.stream(text="abcdefgh", request_id="good", step_delay=0.002)
        with pytest.raises(errors.ModelError, match="injected fault"):
            engine.generate(text="abcdefgh", request_id="bad", step_delay=0.002)
        assert GenerateResult.from_events("good", list(good)).text == "abcdefgh"
    finally:
        engine.scheduler.fault_hook = None
    assert engine.generate(text="ok").text == "ok"
    _wait_idle(engine)


def test_concurrent_callers_share_batched_steps(engine: Engine) -> None:
    results: dict[int, str] = {}

    def call(i: int) -> None:
        res = engine.generate(text="abcdefghij", step_delay=0.002, seed=i)
        assert isinstance(res, GenerateResult)
        results[i] = res.text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    before = len(engine.runner.batch_sizes)  # type: ignore[attr-defined]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(text == "abcdefghij" for text in results.values()) and len(results) == 6
    assert max(engine.runner.batch_sizes[before:]) > 1  # type: ignore[attr-defined]
    _wait_idle(engine)
