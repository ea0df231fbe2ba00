"""Drive N concurrent requests through an Engine (or a server) and time each one.

Per request: time to first audio (submit -> first AudioChunk), total time
(submit -> Finished), output tokens, seconds of audio and images. Aggregate:
output tokens of all requests over the wall time from the first submit to the
last finish. The in-process side (:func:`run_engine_load`) lives here; the HTTP
side, in a process of its own, is in ``_serving.py``. Importing this module does
not import torch, so that client process stays light.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mstar.types import AudioChunk, Event, Finished, GenerateResult, ImageChunk

if TYPE_CHECKING:
    from mstar.engine import Engine, EventStream

__all__ = ["LoadResult", "RequestTiming", "StreamTimer", "run_engine_load", "timing_of_result"]


@dataclass(slots=True)
class RequestTiming:
    """What one request took and produced."""

    ttfa_s: float | None  # submit -> first audio chunk (None: no audio, or not streamed)
    total_s: float  # submit -> Finished
    output_tokens: int
    audio_s: float
    finish_reason: str
    images: int = 0

    @property
    def rtf(self) -> float | None:
        """Real-time factor: wall time per second of audio (below 1 is faster than real time)."""
        return self.total_s / self.audio_s if self.audio_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rtf": self.rtf}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RequestTiming:
        return cls(doc["ttfa_s"], doc["total_s"], doc["output_tokens"], doc["audio_s"], doc["finish_reason"], doc.get("images", 0))


@dataclass(slots=True)
class LoadResult:
    """N requests run together."""

    n: int
    wall_s: float
    requests: list[RequestTiming]

    @property
    def tokens(self) -> int:
        return sum(r.output_tokens for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "wall_s": self.wall_s, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s, "requests": [r.to_dict() for r in self.requests]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> LoadResult:
        return cls(doc["n"], doc["wall_s"], [RequestTiming.from_dict(r) for r in doc["requests"]])


class StreamTimer:
    """Times one streamed request from its events (the same bookkeeping in process and over HTTP)."""

    __slots__ = ("first_audio", "images", "rate", "samples", "t0")

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.first_audio: float | None = None
        self.samples = 0
        self.rate = 1
        self.images = 0

    def see(self, ev: Event) -> RequestTiming | None:
        """Account for ``ev``; the request's timing once ``ev`` is its Finished, else None."""
        if isinstance(ev, AudioChunk):
            if self.first_audio is None:
                self.first_audio = time.perf_counter()
            self.samples += len(ev)
            self.rate = ev.sample_rate
        elif isinstance(ev, ImageChunk):
            self.images += 1
        elif isinstance(ev, Finished):
            end = time.perf_counter()
            ttfa = None if self.first_audio is None else self.first_audio - self.t0
            return RequestTiming(ttfa, end - self.t0, ev.usage.output_tokens, self.samples / self.rate, ev.finish_reason, self.images)
        return None


def timing_of_result(res: GenerateResult, t0: float) -> RequestTiming:
    """The timing of a non-streamed request whose whole result arrived just now."""
    audio_s = res.audio.duration if res.audio is not None else 0.0
    return RequestTiming(None, time.perf_counter() - t0, res.usage.output_tokens, audio_s, res.finish_reason, len(res.images))


def _drain(stream: EventStream, t0: float, out: list[RequestTiming | BaseException], idx: int) -> None:
    timer = StreamTimer(t0)
    try:
        for ev in stream:
            done = timer.see(ev)
            if done is not None:
                out[idx] = done
    except BaseException as exc:  # reported by the caller
        out[idx] = exc


def _collect(engine: Engine, request: dict[str, Any], t0: float, out: list[RequestTiming | BaseException], idx: int) -> None:
    try:
        res = engine.generate(stream=False, **request)
        assert isinstance(res, GenerateResult)
        out[idx] = timing_of_result(res, t0)
    except BaseException as exc:  # reported by the caller
        out[idx] = exc


def run_engine_load(
    engine: Engine,
    texts: list[str],
    kwargs: dict[str, Any],
    *,
    seed0: int = 1000,
    outputs: Sequence[str] = ("audio",),
    streaming: bool = True,
) -> LoadResult:
    """Submit one request per text at once (distinct seeds) and wait for all of them.

    ``streaming`` drains each request's event stream as it comes (time to first audio is
    measured); otherwise each request is one blocking ``engine.generate`` call, the in-process
    twin of a non-streamed ``POST /generate``."""
    results: list[RequestTiming | BaseException] = [RuntimeError("no result")] * len(texts)
    threads = []
    start = time.perf_counter()
    for i, text in enumerate(texts):
        request = {"text": text, "output_modalities": tuple(outputs), "seed": seed0 + i, **kwargs}
        t0 = time.perf_counter()
        if streaming:
            stream = engine.generate(stream=True, **request)
            th = threading.Thread(target=_drain, args=(stream, t0, results, i), daemon=True)
        else:
            th = threading.Thread(target=_collect, args=(engine, request, t0, results, i), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return LoadResult(len(texts), wall, check_results(results))


def check_results(results: list[RequestTiming | BaseException]) -> list[RequestTiming]:
    """The timings, or RuntimeError naming how many requests failed and the first failure."""
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} requests failed; first: {errors[0]!r}") from errors[0]
    return [r for r in results if isinstance(r, RequestTiming)]
