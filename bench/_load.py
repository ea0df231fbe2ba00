"""Drive N concurrent requests through an Engine (or a server) and time each one.

Per request: time to first audio (submit -> first AudioChunk), total time
(submit -> Finished), output tokens and seconds of audio. Aggregate: output
tokens of all requests over the wall time from the first submit to the last
finish.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from mstar.engine import Engine, EventStream
from mstar.types import AudioChunk, ErrorChunk, Finished, event_from_wire


@dataclass(slots=True)
class RequestTiming:
    """What one request took and produced."""

    ttfa_s: float | None  # submit -> first audio chunk
    total_s: float  # submit -> Finished
    output_tokens: int
    audio_s: float
    finish_reason: str

    @property
    def rtf(self) -> float | None:
        """Real-time factor: wall time per second of audio (below 1 is faster than real time)."""
        return self.total_s / self.audio_s if self.audio_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rtf": self.rtf}


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


def _drain(stream: EventStream, t0: float, out: list[RequestTiming | BaseException], idx: int) -> None:
    first: float | None = None
    samples = 0
    rate = 1
    try:
        for ev in stream:
            if isinstance(ev, AudioChunk):
                if first is None:
                    first = time.perf_counter()
                samples += len(ev)
                rate = ev.sample_rate
            elif isinstance(ev, Finished):
                end = time.perf_counter()
                out[idx] = RequestTiming(
                    None if first is None else first - t0, end - t0, ev.usage.output_tokens, samples / rate, ev.finish_reason
                )
    except BaseException as exc:  # reported by the caller
        out[idx] = exc


def run_engine_load(engine: Engine, texts: list[str], kwargs: dict[str, Any], *, seed0: int = 1000) -> LoadResult:
    """Submit one request per text at once (distinct seeds) and wait for all of them."""
    results: list[RequestTiming | BaseException] = [RuntimeError("no result")] * len(texts)
    threads = []
    start = time.perf_counter()
    for i, text in enumerate(texts):
        t0 = time.perf_counter()
        stream = engine.stream(text=text, output_modalities=("audio",), seed=seed0 + i, **kwargs)
        th = threading.Thread(target=_drain, args=(stream, t0, results, i), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return LoadResult(len(texts), wall, _check(results))


def run_http_load(base_url: str, texts: list[str], kwargs: dict[str, Any], *, seed0: int = 1000, timeout: float = 600.0) -> LoadResult:
    """The same load through ``POST /generate`` (NDJSON streaming), one client thread per request."""
    import httpx

    results: list[RequestTiming | BaseException] = [RuntimeError("no result")] * len(texts)
    barrier = threading.Barrier(len(texts) + 1)

    def one(i: int, text: str) -> None:
        body = {"text": text, "output_modalities": "audio", "streaming": True, "model_kwargs": {**kwargs, "seed": seed0 + i}}
        try:
            with httpx.Client(base_url=base_url, timeout=timeout) as client:
                barrier.wait()
                t0 = time.perf_counter()
                first: float | None = None
                samples, rate = 0, 1
                with client.stream("POST", "/generate", json=body) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        ev = event_from_wire(json.loads(line))
                        if isinstance(ev, AudioChunk):
                            if first is None:
                                first = time.perf_counter()
                            samples += len(ev)
                            rate = ev.sample_rate
                        elif isinstance(ev, ErrorChunk):
                            raise RuntimeError(f"error line: {ev}")
                        elif isinstance(ev, Finished):
                            end = time.perf_counter()
                            results[i] = RequestTiming(
                                None if first is None else first - t0, end - t0, ev.usage.output_tokens, samples / rate, ev.finish_reason
                            )
        except BaseException as exc:
            results[i] = exc
            try:
                barrier.abort()
            except Exception:
                pass

    threads = [threading.Thread(target=one, args=(i, t), daemon=True) for i, t in enumerate(texts)]
    for th in threads:
        th.start()
    barrier.wait()  # every client connected and ready: start the clock
    start = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return LoadResult(len(texts), wall, _check(results))


def _check(results: list[RequestTiming | BaseException]) -> list[RequestTiming]:
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} requests failed; first: {errors[0]!r}") from errors[0]
    return [r for r in results if isinstance(r, RequestTiming)]


class UvicornThread:
    """Serve an ASGI app with uvicorn on a background thread of this process."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="bench-uvicorn")

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
