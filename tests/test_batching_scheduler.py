"""Continuous batching through the scheduler, on the fake model (behaviour common to every family).

The fake runner draws one random number per step from the request's own
generator, so its audio is a fingerprint of that generator's stream: any
sharing of generators between requests, or a step skipped or repeated because
of a neighbour, changes the output.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

import mstar
from mstar.engine import EventStream, derive_seed
from mstar.errors import MStarError
from mstar.registry import ModelInfo, register_model
from mstar.request import Request
from mstar.types import GenerateResult
from tests.fake_model import FakeRunner

STEP = 0.002  # seconds per fake step: long enough for requests to overlap


class SlotLimitedRunner(FakeRunner):
    """The fake model with a fixed number of KV "slots": admit refuses when all are held."""

    name = "fake-slots"
    num_slots = 2

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.peak_held = 0

    def admit(self, req: Request) -> bool:
        if len(self.held) >= self.num_slots:
            return False
        ok = super().admit(req)
        self.peak_held = max(self.peak_held, len(self.held))
        return ok


register_model(
    ModelInfo(
        name="fake-slots",
        description="test double with a bounded number of slots",
        hub_id="none/fake",
        input_modalities=("text",),
        output_modalities=("text", "audio"),
        runner="tests.test_batching_scheduler:SlotLimitedRunner",
    )
)


@pytest.fixture
def engine() -> Any:
    with mstar.Engine("fake", device="cpu") as eng:
        yield eng


def _start(eng: mstar.Engine, rid: str, seed: int, n: int) -> EventStream:
    out = eng.generate(
        text="hello world", output_modalities=("text", "audio"), stream=True, request_id=rid,
        seed=seed, max_output_tokens=n, step_delay=STEP,
    )
    assert isinstance(out, EventStream)
    return out


def _drain(stream: EventStream) -> GenerateResult:
    return GenerateResult.from_events(stream.request_id, list(stream))


def _solo(eng: mstar.Engine, seed: int, n: int) -> GenerateResult:
    return _drain(_start(eng, f"solo-{seed}-{n}", seed, n))


def _pcm(res: GenerateResult) -> bytes:
    assert res.audio is not None
    return res.audio.pcm


def _wait_idle(eng: mstar.Engine, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = eng.stats()
        if st["inflight"] == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.01)


def test_request_generator_is_seeded_from_its_effective_seed(engine: mstar.Engine) -> None:
    res = _solo(engine, seed=7, n=5)
    gen = torch.Generator().manual_seed(7)
    expected = b"".join(torch.full((240,), torch.rand((), generator=gen).item() * 1000).to(torch.int16).numpy().tobytes() for _ in range(5))
    assert _pcm(res) == expected and res.seed == 7
    # Without a seed, the effective seed is derived from the request id and reported back.
    unseeded = engine.generate(text="hi", output_modalities=("audio",), request_id="rid-42", max_output_tokens=3)
    assert isinstance(unseeded, GenerateResult) and unseeded.seed == derive_seed("rid-42")


def test_seeded_request_gives_the_same_output_alone_or_in_a_batch(engine: mstar.Engine) -> None:
    solo = {s: _solo(engine, s, 20) for s in (1, 2, 3, 4)}
    engine.runner.batch_sizes.clear()  # type: ignore[attr-defined]
    streams = {s: _start(engine, f"b{s}", s, 20) for s in (1, 2, 3, 4)}
    batched = {s: _drain(st) for s, st in streams.items()}
    assert max(engine.runner.batch_sizes) > 1  # type: ignore[attr-defined]
    for s in solo:
        assert _pcm(batched[s]) == _pcm(solo[s]) and batched[s].text == solo[s].text


def test_a_request_finishing_early_does_not_stall_or_change_the_others(engine: mstar.Engine) -> None:
    long_solo = _solo(engine, 11, 40)
    short = _start(engine, "short", 12, 3)
    long = _start(engine, "long", 11, 40)
    assert _drain(short).finish_reason == "length"
    res = _drain(long)
    assert _pcm(res) == _pcm(long_solo) and res.finish_reason == "length"


def test_a_cancelled_request_leaves_the_others_intact(engine: mstar.Engine) -> None:
    solo = {s: _solo(engine, s, 30) for s in (21, 23)}
    a = _start(engine, "a", 21, 30)
    victim = _start(engine, "victim", 22, 10_000)
    b = _start(engine, "b", 23, 30)
    assert victim.next_event(timeout=5) is not None  # it is running ...
    assert engine.cancel("victim")  # ... and is cancelled mid-flight
    assert _drain(victim).finish_reason == "cancelled"
    assert _pcm(_drain(a)) == _pcm(solo[21])
    assert _pcm(_drain(b)) == _pcm(solo[23])
    assert _wait_idle(engine)["kv_slots_used"] == 0


def test_a_failing_request_leaves_the_others_intact(engine: mstar.Engine) -> None:
    solo = {s: _solo(engine, s, 30) for s in (31, 33)}

    def fault(req: Request) -> None:
        if req.request_id == "bad" and req.steps >= 5:
            raise RuntimeError("injected fault")

    engine.scheduler.fault_hook = fault
    a, bad, b = _start(engine, "a", 31, 30), _start(engine, "bad", 32, 30), _start(engine, "b", 33, 30)
    with pytest.raises(MStarError, match="injected fault"):
        _drain(bad)
    assert _pcm(_drain(a)) == _pcm(solo[31])
    assert _pcm(_drain(b)) == _pcm(solo[33])
    assert _wait_idle(engine)["kv_slots_used"] == 0


def test_requests_joining_mid_flight_match_their_solo_runs(engine: mstar.Engine) -> None:
    solo = {s: _solo(engine, s, 30) for s in (41, 42, 43)}
    engine.runner.batch_sizes.clear()  # type: ignore[attr-defined]
    first = _start(engine, "first", 41, 30)
    events = [first.next_event(timeout=5) for _ in range(10)]  # a few steps in
    late = [_start(engine, f"late{s}", s, 30) for s in (42, 43)]
    rest = list(first)
    first_res = GenerateResult.from_events("first", [e for e in events if e is not None] + rest)
    assert _pcm(first_res) == _pcm(solo[41])
    for s, st in zip((42, 43), late, strict=True):
        assert _pcm(_drain(st)) == _pcm(solo[s])
    sizes = engine.runner.batch_sizes  # type: ignore[attr-defined]
    assert sizes[0] == 1 and max(sizes) == 3  # alone at first, then joined


def test_when_slots_run_out_requests_wait_and_all_complete() -> None:
    with mstar.Engine("fake-slots", device="cpu") as eng:
        solo = {s: _solo(eng, s, 15) for s in range(50, 56)}
        streams = {s: _start(eng, f"q{s}", s, 15) for s in range(50, 56)}
        assert eng.stats()["waiting"] + eng.stats()["inflight"] > 0
        results = {s: _drain(st) for s, st in streams.items()}
        runner = eng.runner
        assert isinstance(runner, SlotLimitedRunner)
        assert runner.peak_held == SlotLimitedRunner.num_slots  # never more than the slots ...
        for s, res in results.items():  # ... and none lost or changed by waiting
            assert res.finish_reason == "length" and _pcm(res) == _pcm(solo[s])
        st = _wait_idle(eng)
        assert st["kv_slots_used"] == 0 and st["waiting"] == 0 and st["active"] == 0


def test_concurrent_callers_from_many_threads_all_complete(engine: mstar.Engine) -> None:
    solo = {s: _solo(engine, s, 12) for s in range(60, 68)}
    got: dict[int, GenerateResult] = {}

    def call(s: int) -> None:
        res = engine.generate(text="hello world", output_modalities=("text", "audio"), seed=s, max_output_tokens=12, step_delay=STEP)
        assert isinstance(res, GenerateResult)
        got[s] = res

    threads = [threading.Thread(target=call, args=(s,)) for s in solo]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert {s: _pcm(r) for s, r in got.items()} == {s: _pcm(r) for s, r in solo.items()}
    assert _wait_idle(engine)["kv_slots_used"] == 0
