"""Continuous batching isolation on tiny Orpheus (fp32, CPU).

Each request's audio run alone is the reference. Batched with others, joined
mid-flight, next to a request that is cancelled, fails or finishes early, or
held back because the KV cache is full, a seeded request must produce exactly
the same samples (so exactly the same tokens: any changed token changes its
SNAC codes and so the waveform), greedy and sampled alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import mstar
from mstar.engine import EventStream, derive_seed
from mstar.errors import MStarError
from mstar.request import Request
from mstar.types import AudioChunk, GenerateResult

# name -> (text, kwargs). Prompts differ in length so batched prefill pads; "c" is greedy.
SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "a": ("Hello there.", {"seed": 101, "max_output_tokens": 29}),
    "b": ("A somewhat longer sentence, so that the prompts differ in length.", {"seed": 102, "max_output_tokens": 36}),
    "c": ("Hi", {"seed": 103, "max_output_tokens": 29, "temperature": 0.0}),
    "d": ("Late comer", {"seed": 104, "max_output_tokens": 29, "voice": "leo"}),
}


@pytest.fixture(scope="module")
def engine() -> Iterator[mstar.Engine]:
    with mstar.Engine("orpheus", weights="tiny", device="cpu", dtype="float32") as eng:
        yield eng


_SOLO: dict[str, GenerateResult] = {}


def _start(eng: mstar.Engine, name: str, rid: str, **override: Any) -> EventStream:
    text, kwargs = SPECS[name]
    return eng.stream(text=text, output_modalities=("audio",), request_id=rid, **{**kwargs, **override})


def _drain(stream: EventStream, first: list[Any] | None = None) -> GenerateResult:
    return GenerateResult.from_events(stream.request_id, (first or []) + list(stream))


def _solo(eng: mstar.Engine, name: str) -> GenerateResult:
    """The request run alone (computed once per module)."""
    if name not in _SOLO:
        _SOLO[name] = _drain(_start(eng, name, f"solo-{name}"))
        assert _SOLO[name].audio is not None and _SOLO[name].finish_reason == "length"
    return _SOLO[name]


def _same(res: GenerateResult, ref: GenerateResult) -> None:
    assert res.audio is not None and ref.audio is not None
    assert res.usage.output_tokens == ref.usage.output_tokens and res.finish_reason == ref.finish_reason
    assert res.audio.pcm == ref.audio.pcm


def _first_audio(stream: EventStream, timeout: float = 60.0) -> list[Any]:
    """Read events until the first audio chunk (so the request is well into decoding)."""
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = stream.next_event(timeout=1.0)
        if ev is not None:
            seen.append(ev)
            if isinstance(ev, AudioChunk):
                return seen
    raise AssertionError("no audio within the timeout")


def _idle_stats(eng: mstar.Engine, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while eng.stats()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return eng.stats()


@pytest.mark.slow
def test_seeded_requests_give_their_solo_samples_in_a_batch_greedy_and_sampled(engine: mstar.Engine) -> None:
    solo = {n: _solo(engine, n) for n in "abc"}
    before = engine.stats()["forwards"]["decode"]
    streams = {n: _start(engine, n, f"batch-{n}") for n in "abc"}
    results = {n: _drain(s) for n, s in streams.items()}
    # Batched for real: far fewer decode forwards than tokens (a and c finish first; b goes on alone).
    assert engine.stats()["forwards"]["decode"] - before < sum(r.usage.output_tokens for r in results.values()) - 25
    for n in "abc":
        _same(results[n], solo[n])
    assert _idle_stats(engine)["kv_slots_used"] == 0


@pytest.mark.slow
def test_cancelling_one_request_leaves_the_others_unchanged(engine: mstar.Engine) -> None:
    solo = {n: _solo(engine, n) for n in "ab"}
    a = _start(engine, "a", "cx-a")
    victim = _start(engine, "d", "cx-victim", max_output_tokens=300)
    b = _start(engine, "b", "cx-b")
    _first_audio(victim)
    assert engine.cancel("cx-victim")
    assert _drain(victim).finish_reason == "cancelled"
    _same(_drain(a), solo["a"])
    _same(_drain(b), solo["b"])
    assert _idle_stats(engine)["kv_slots_used"] == 0


def test_a_failing_request_leaves_the_others_unchanged(engine: mstar.Engine) -> None:
    solo = {n: _solo(engine, n) for n in "ac"}

    def fault(req: Request) -> None:
        if req.request_id == "fx-bad" and req.steps >= 8:
            raise RuntimeError("injected fault")

    engine.scheduler.fault_hook = fault
    try:
        a, bad, c = _start(engine, "a", "fx-a"), _start(engine, "b", "fx-bad"), _start(engine, "c", "fx-c")
        with pytest.raises(MStarError, match="injected fault"):
            _drain(bad)
        _same(_drain(a), solo["a"])
        _same(_drain(c), solo["c"])
    finally:
        engine.scheduler.fault_hook = None
    assert _idle_stats(engine)["kv_slots_used"] == 0


@pytest.mark.slow
def test_a_request_joining_mid_flight_and_the_one_running_both_match_solo(engine: mstar.Engine) -> None:
    solo = {n: _solo(engine, n) for n in "bd"}
    b = _start(engine, "b", "join-b")
    head = _first_audio(b)  # b is 28 tokens in
    d = _start(engine, "d", "join-d")
    _same(_drain(d), solo["d"])
    _same(_drain(b, head), solo["b"])
    assert _idle_stats(engine)["kv_slots_used"] == 0


@pytest.mark.slow
def test_unseeded_request_uses_the_seed_derived_from_its_id(engine: mstar.Engine) -> None:
    res = engine.generate(text="Seed me", output_modalities=("audio",), request_id="seedless-1", max_output_tokens=28)
    assert isinstance(res, GenerateResult) and res.seed == derive_seed("seedless-1")
    again = engine.generate(text="Seed me", output_modalities=("audio",), seed=res.seed, max_output_tokens=28)
    assert isinstance(again, GenerateResult) and again.audio is not None and res.audio is not None
    assert again.audio.pcm == res.audio.pcm


@pytest.mark.slow
def test_requests_wait_when_kv_slots_run_out_and_all_complete_unchanged(engine: mstar.Engine) -> None:
    solo = {n: _solo(engine, n) for n in "abcd"}
    with mstar.Engine("orpheus", weights="tiny", device="cpu", dtype="float32", max_batch_size=2) as small:
        assert small.stats()["kv_slots_total"] == 2
        streams = {n: _start(small, n, f"kv-{n}") for n in "abcd"}
        head = _first_audio(streams["a"])
        st = small.stats()
        assert st["kv_slots_used"] == 2 and st["waiting"] == 2  # two run, two wait: nobody evicted
        results = {n: _drain(s, head if n == "a" else None) for n, s in streams.items()}
        for n in "abcd":
            _same(results[n], solo[n])
        st = _idle_stats(small)
        assert st["kv_slots_used"] == 0 and st["waiting"] == 0 and st["inflight"] == 0


@pytest.mark.slow
def test_static_shape_decode_path_gives_the_same_samples(engine: mstar.Engine) -> None:
    """cuda_graphs=True pads decode batches to buckets (compiled into CUDA graphs on GPUs)."""
    solo = {n: _solo(engine, n) for n in "abc"}
    with mstar.Engine("orpheus", weights="tiny", device="cpu", dtype="float32", cuda_graphs=True) as padded:
        assert getattr(padded.runner, "graphed", None) is not None
        streams = {n: _start(padded, n, f"pad-{n}") for n in "abc"}  # 3 rows padded to 4, then b alone
        for n, s in streams.items():
            _same(_drain(s), solo[n])
        st = _idle_stats(padded)
        assert st["kv_slots_used"] == 0 and st["kv_slots_total"] == engine.stats()["kv_slots_total"]
