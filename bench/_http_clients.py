"""N HTTP clients sending the same requests as :func:`_load.run_engine_load` to ``POST /generate``.

Run as a script, this is the bench's client process: it reads one JSON job per line on stdin
(``{"url", "texts", "kwargs", "seed0", "outputs", "streaming"}``) and answers each with one JSON
line on stdout (``{"result": LoadResult}`` or ``{"error": "..."}``). Keeping the clients out of
the server's process and out of the in-process Engine's process means their JSON parsing and
base64 decoding is charged to neither side. torch is never imported here.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import _common  # noqa: F401  (sets sys.path and offline env first)
from _load import LoadResult, RequestTiming, StreamTimer, check_results, timing_of_result

from mstar.types import ErrorChunk, GenerateResult, event_from_wire

__all__ = ["run_http_load"]


def _one(
    client: Any, body: dict[str, Any], barrier: threading.Barrier, streaming: bool
) -> RequestTiming:
    barrier.wait()
    t0 = time.perf_counter()
    if not streaming:
        resp = client.post("/generate", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        return timing_of_result(GenerateResult.from_json(resp.json()), t0)
    timer = StreamTimer(t0)
    with client.stream("POST", "/generate", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.strip():
                continue
            ev = event_from_wire(json.loads(line))
            if isinstance(ev, ErrorChunk):
                raise RuntimeError(f"error line: {ev}")
            done = timer.see(ev)
            if done is not None:
                return done
    raise RuntimeError("the stream ended without a Finished line")


def run_http_load(
    base_url: str,
    texts: list[str],
    kwargs: dict[str, Any],
    *,
    seed0: int = 1000,
    outputs: Sequence[str] = ("audio",),
    streaming: bool = True,
    timeout: float = 600.0,
) -> LoadResult:
    """The load of ``run_engine_load`` through ``POST /generate``, one client thread per request.

    ``streaming`` asks for NDJSON (time to first audio measured at its first audio line);
    otherwise the JSON result document. The clock starts once every client is ready."""
    import httpx

    results: list[RequestTiming | BaseException] = [RuntimeError("no result")] * len(texts)
    barrier = threading.Barrier(len(texts) + 1)

    def run(i: int, text: str) -> None:
        body = {
            "text": text, "output_modalities": ",".join(outputs), "streaming": streaming,
            "model_kwargs": {**kwargs, "seed": seed0 + i},
        }
        try:
            with httpx.Client(base_url=base_url, timeout=timeout) as client:
                results[i] = _one(client, body, barrier, streaming)
        except BaseException as exc:
            results[i] = exc
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i, t), daemon=True) for i, t in enumerate(texts)]
    for th in threads:
        th.start()
    try:
        barrier.wait()  # every client ready: start the clock
    except threading.BrokenBarrierError:
        pass  # a client failed before the start; its error is in results
    start = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return LoadResult(len(texts), wall, check_results(results))


def _serve_jobs() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            res = run_http_load(
                job["url"], job["texts"], job["kwargs"], seed0=job["seed0"], outputs=job["outputs"], streaming=job["streaming"]
            )
            reply: dict[str, Any] = {"result": res.to_dict()}
        except Exception as exc:  # sent back; the bench process raises it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve_jobs())
