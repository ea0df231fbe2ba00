"""bench/server_overhead.py's harness: a server process, a client process and the in-process Engine
run the same requests and agree on what they produced (the fake model, so it stays fast)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _load  # noqa: E402
import _serving  # noqa: E402

import mstar  # noqa: E402
import tests.fake_model  # noqa: E402, F401  (registers "fake")

KWARGS = {"max_output_tokens": 6, "step_delay": 0.0}
FLAGS = ["--model", "fake", "--device", "cpu", "--max-batch-size", "2", "--max-concurrent", "2", "--max-queue", "2",
         "--log-level", "warning"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_server_process_and_engine_produce_the_same_requests() -> None:
    texts = ["first request", "second one"]
    engine = mstar.Engine("fake", device="cpu", max_batch_size=2)
    loads = {}
    try:
        with _serving.ServerProcess(FLAGS, setup="fake") as server, _serving.ClientProcess() as clients:
            assert server.pid != os.getpid()
            assert clients.proc is not None and clients.proc.pid not in (os.getpid(), server.pid)
            for streaming in (True, False):
                loads["http", streaming] = clients.run(server.url, texts, KWARGS, outputs=("audio",), streaming=streaming)
                loads["engine", streaming] = _load.run_engine_load(engine, texts, KWARGS, outputs=("audio",), streaming=streaming)
            assert server.cpu_s() > 0
        assert server.proc is not None and server.proc.returncode is not None  # stopped on exit
    finally:
        engine.close()
    for (_side, streaming), res in loads.items():
        assert res.n == 2 and res.wall_s > 0
        assert [r.output_tokens for r in res.requests] == [6, 6]
        assert all(r.audio_s > 0 and r.finish_reason == "length" for r in res.requests)
        assert all((r.ttfa_s is not None) == streaming for r in res.requests)
    for streaming in (True, False):
        assert [r.audio_s for r in loads["http", streaming].requests] == [r.audio_s for r in loads["engine", streaming].requests]
