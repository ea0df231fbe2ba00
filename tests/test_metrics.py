"""``GET /metrics``: Prometheus counters, histograms and gauges that move with the server's load."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mstar.server import create_app
from tests.helpers.servers import ServerThread

if TYPE_CHECKING:
    from mstar.engine import Engine

pytestmark = pytest.mark.timeout(240)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, its labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def scrape(url: str, **kw: Any) -> Samples:
    resp = httpx.get(url + "/metrics", timeout=10, **kw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


@pytest.fixture(scope="module")
def orpheus_server(shared_engine: Callable[[str], Engine], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tiny Orpheus behind a real server that runs two requests at once and queues none."""
    app = create_app(shared_engine("orpheus"), upload_dir=tmp_path_factory.mktemp("uploads"), max_concurrent=2, max_queue=0)
    with ServerThread(app) as srv:
        yield srv.url


def _stream(url: str, fields: dict[str, str], out: dict[str, Any], first: threading.Event) -> None:
    with httpx.Client(timeout=120) as client, client.stream("POST", url + "/generate", data=fields) as resp:
        out["status"] = resp.status_code
        lines = []
        for line in resp.iter_lines():
            if line.strip():
                lines.append(json.loads(line))
                first.set()
        out["lines"] = lines
    first.set()


def _start_stream(url: str, kwargs: dict[str, Any], request_id: str) -> tuple[threading.Thread, dict[str, Any], threading.Event]:
    fields = {"text": "metrics under load", "output_modalities": "audio", "model_kwargs": json.dumps(kwargs),
              "request_id": request_id}
    out: dict[str, Any] = {}
    first = threading.Event()
    thread = threading.Thread(target=_stream, args=(url, fields, out, first), daemon=True)
    thread.start()
    return thread, out, first


@pytest.mark.slow
def test_counters_and_histograms_move_during_and_after_load(orpheus_server: str) -> None:
    url = orpheus_server
    gen = {"route": "/generate", "model": "orpheus"}
    before = scrape(url)
    bad = httpx.post(url + "/generate", data={"text": "hi", "model_kwargs": '{"no_such_knob": 1}'}, timeout=30)
    assert bad.status_code == 400

    finishing = _start_stream(url, {"max_output_tokens": 120, "seed": 1}, "metrics-finishing")
    cancelled = _start_stream(url, {"max_output_tokens": 340, "seed": 2}, "metrics-cancelled")
    assert finishing[2].wait(60) and cancelled[2].wait(60), "the streams never started"

    during = scrape(url)
    assert value(during, "mstar_server_requests_running") == 2
    assert value(during, "mstar_model_ready") == 1
    assert value(during, "mstar_kv_slots_total") > 0 and value(during, "mstar_kv_cache_usage_ratio") > 0
    # The first audio of each running request is observed as it arrives, not when the request ends.
    assert value(during, "mstar_time_to_first_audio_seconds_count", **gen) >= value(
        before, "mstar_time_to_first_audio_seconds_count", **gen) + 2
    assert value(during, "mstar_output_audio_seconds_total", **gen) > value(before, "mstar_output_audio_seconds_total", **gen)

    busy = httpx.post(url + "/generate", data={"text": "no room", "streaming": "false"}, timeout=30)
    assert busy.status_code == 429  # admission comes first: two run, none may wait
    assert httpx.post(url + "/cancel/metrics-cancelled", timeout=30).json()["cancelled"] is True
    for thread, _, _ in (finishing, cancelled):
        thread.join(120)
    assert finishing[1]["lines"][-1]["metadata"]["finish_reason"] == "length"
    assert cancelled[1]["lines"][-1]["metadata"]["finish_reason"] == "cancelled"
    timed = httpx.post(url + "/generate", timeout=60, data={
        "text": "too slow", "streaming": "false", "model_kwargs": json.dumps({"timeout": 0.001, "max_output_tokens": 200})})
    assert timed.status_code == 200 and timed.json()["finish_reason"] == "timeout"

    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mstar_requests_total", **gen, status="200", finish_reason="length") == 1
    assert moved("mstar_requests_total", **gen, status="200", finish_reason="cancelled") == 1
    assert moved("mstar_requests_total", **gen, status="200", finish_reason="timeout") == 1
    assert moved("mstar_requests_total", **gen, status="429", finish_reason="none") == 1
    assert moved("mstar_requests_total", **gen, status="400", finish_reason="none") == 1
    assert moved("mstar_requests_total", route="/cancel/{request_id}", status="200") == 1
    assert moved("mstar_request_errors_total", **gen, code="queue_full") == 1
    assert moved("mstar_request_errors_total", **gen, code="unknown_parameter") == 1
    assert moved("mstar_rate_limited_total", **gen) == 1
    assert moved("mstar_request_cancellations_total", **gen) == 1
    assert moved("mstar_request_timeouts_total", **gen) == 1
    assert moved("mstar_request_duration_seconds_count", **gen) == 3
    assert moved("mstar_request_duration_seconds_sum", **gen) > 0
    assert moved("mstar_real_time_factor_count", **gen) >= 2
    assert moved("mstar_output_tokens_total", **gen) >= 120
    assert moved("mstar_prefix_cache_queried_tokens_total") > 0
    assert moved("mstar_component_calls_total", component="decode") > 0
    assert moved("mstar_engine_steps_total") > 0
    assert value(after, "mstar_server_requests_running") == 0
    assert value(after, "mstar_time_to_first_token_seconds_count", **gen) == 0  # speech: no text events


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_counts_as_a_disconnect(orpheus_server: str) -> None:
    url = orpheus_server
    before = scrape(url)
    fields = {"text": "leaving early", "output_modalities": "audio", "model_kwargs": '{"max_output_tokens": 340}'}
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/generate", data=fields) as resp:
        assert next(resp.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 30
    while value(scrape(url), "mstar_client_disconnects_total", route="/generate") == value(
            before, "mstar_client_disconnects_total", route="/generate"):
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.1)
    after = scrape(url)
    assert value(after, "mstar_requests_total", route="/generate", finish_reason="disconnected") == value(
        before, "mstar_requests_total", route="/generate", finish_reason="disconnected") + 1


def test_metrics_need_the_api_key_unless_made_public(shared_engine: Callable[[str], Engine], tmp_path: Path) -> None:
    engine = shared_engine("fake")
    with TestClient(create_app(engine, api_key="k", upload_dir=tmp_path)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    with TestClient(create_app(engine, api_key="k", public_metrics=True, upload_dir=tmp_path)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.post("/generate", data={"text": "hi"}).status_code == 401  # only /metrics is opened


def test_each_app_counts_in_its_own_registry(shared_engine: Callable[[str], Engine], tmp_path: Path) -> None:
    engine = shared_engine("fake")
    with TestClient(create_app(engine, upload_dir=tmp_path)) as one, TestClient(create_app(engine, upload_dir=tmp_path)) as two:
        assert one.post("/generate", data={"text": "hi", "streaming": "false"}).status_code == 200
        counted_one = value(parse(one.get("/metrics").text), "mstar_requests_total", route="/generate")
        counted_two = value(parse(two.get("/metrics").text), "mstar_requests_total", route="/generate")
    assert (counted_one, counted_two) == (1, 0)


def test_text_requests_observe_time_to_first_token_and_tokens(shared_engine: Callable[[str], Engine], tmp_path: Path) -> None:
    with TestClient(create_app(shared_engine("fake"), upload_dir=tmp_path)) as client:
        resp = client.post("/generate", data={"text": "hello", "output_modalities": "text", "streaming": "true"})
        assert resp.status_code == 200
        samples = parse(client.get("/metrics").text)
    labels = {"route": "/generate", "model": "fake"}
    assert value(samples, "mstar_time_to_first_token_seconds_count", **labels) == 1
    assert value(samples, "mstar_output_tokens_total", **labels) == 5
    assert value(samples, "mstar_requests_total", **labels, status="200", finish_reason="stop") == 1


def test_without_prometheus_client_metrics_answers_404_naming_the_package(
    shared_engine: Callable[[str], Engine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import prometheus_client now raises ImportError
    with TestClient(create_app(shared_engine("fake"), upload_dir=tmp_path)) as client:
        resp = client.get("/metrics")
        assert resp.status_code == 404 and "prometheus-client" in resp.json()["error"]["message"]
        assert client.post("/generate", data={"text": "hi", "streaming": "false"}).status_code == 200
