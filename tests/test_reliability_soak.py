"""The short soak: ~200 mixed requests (streamed or not, native and OpenAI, a quarter cancelled, some refused
with 429) against real uvicorn servers of the fastest tiny models, and nothing may be lost.

The long run (2,000+ requests, ``bench/soak.py --spawn``) is in docs/reliability.md; both use the driver in
tests/helpers/soak.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

import mstar
from mstar.request import Request
from tests.helpers.servers import serve
from tests.helpers.soak import SoakConfig, SoakReport, run_soak

pytestmark = pytest.mark.slow

MODELS = ("fake", "pi05", "bagel")
RSS_GROWTH_LIMIT_KB = 64 * 1024


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, shared_engine: Any) -> SoakReport:
    root = tmp_path_factory.mktemp("soak")
    engines = [shared_engine(m) for m in MODELS]
    # Small admission limits and more clients than they allow: some requests must be refused with 429.
    with serve(engines[0], root / "fake", max_concurrent=2, max_queue=1) as a, \
            serve(engines[1], root / "pi05", max_concurrent=2, max_queue=1) as b, \
            serve(engines[2], root / "bagel", max_concurrent=2, max_queue=1) as c:
        rep = run_soak([a, b, c], SoakConfig(models=list(MODELS), requests=200, duration_s=40, clients=8, seed=7))
    print("\n" + rep.summary())
    return rep


def test_soak_sent_the_whole_mix(report: SoakReport) -> None:
    assert report.sent == 200
    kinds = {k.split("/", 1)[1] for k in report.by_kind}
    assert {"native_ndjson", "native_json", "chat_sse", "chat_json", "speech_bytes", "speech_sse", "images"} <= kinds
    assert report.counts.get("completed", 0) >= 60
    assert report.counts.get("cancelled_route", 0) >= 5 and report.counts.get("cancelled_disconnect", 0) >= 5
    assert report.counts.get("rejected", 0) >= 1, "the load must exceed the queue so that 429s happen"


def test_soak_has_no_unexpected_5xx_or_other_errors(report: SoakReport) -> None:
    assert report.unexpected_5xx == 0, report.errors
    assert report.other_errors == 0, report.errors


def test_soak_leaves_no_held_slots(report: SoakReport) -> None:
    assert report.held_total == 0, report.held_after


def test_soak_leaves_no_upload_files(report: SoakReport) -> None:
    assert report.leftover_total == 0, report.leftover_files


def test_soak_cancel_stops_within_one_model_step(report: SoakReport) -> None:
    assert report.cancels_measured >= 10
    p99 = report.cancel_stop_steps["p99"]
    assert p99 is not None and p99 <= 1, report.cancel_stop_steps


def test_soak_rss_growth_is_bounded(report: SoakReport) -> None:
    assert report.rss_growth_kb < RSS_GROWTH_LIMIT_KB, (report.rss_kb_before, report.rss_kb_after)


def test_soak_reports_latency_percentiles(report: SoakReport) -> None:
    lat = report.latency_ms
    assert lat["p50"] is not None and lat["p99"] is not None and 0 < lat["p50"] <= lat["p99"]
    summary = report.summary()
    for label in ("completed", "cancelled", "rejected (429)", "unexpected 5xx", "cancel->stop steps", "leftover uploads",
                  "server RSS"):
        assert label in summary



@pytest.mark.usefixtures("fake_models")
def test_soak_harness_catches_faults_and_leftovers(tmp_path: Path) -> None:
    # The harness must see what it is there to see: failing requests as 5xx, a stray upload as a leftover.
    engine = mstar.Engine("fake", weights="tiny")

    def hook(req: Request) -> None:
        if req.steps >= 1 and int(hashlib.sha256(req.request_id.encode()).hexdigest(), 16) % 3 == 0:
            raise RuntimeError("injected")

    try:
        with serve(engine, tmp_path / "up") as srv:
            engine.scheduler.fault_hook = hook
            (tmp_path / "up" / "stray.png").write_bytes(b"x")
            rep = run_soak([srv], SoakConfig(models=["fake"], requests=30, duration_s=20, clients=3, cancel_fraction=0.0,
                                             warmup=False))
    finally:
        engine.close()
    assert rep.unexpected_5xx >= 3 and any("model_error" in e for e in rep.errors), rep.errors
    assert rep.leftover_total == 1
