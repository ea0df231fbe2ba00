"""Replicas on Ray Serve: a local Ray cluster, 2 tiny-Orpheus replicas behind the ingress on loopback.

One cluster for the module (it takes most of the time); the replica-killing test runs last.
Every request is short; each test frees what it started, so the next sees an idle system.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from mstar.errors import (  # noqa: E402
    InvalidParameterError,
    MediaError,
    RateLimitError,
    ReplicaFailedError,
    UnknownVoiceError,
    error_class_for_code,
)
from mstar.serve_ray import APP_NAME, REPLICA_HEADER, Scaling, build_app, deploy  # noqa: E402
from mstar.serve_ray.proxy_headers import PROXY_CALLBACK, PROXY_CALLBACK_ENV  # noqa: E402
from mstar.serve_ray.remote_engine import RemoteEngine  # noqa: E402
from mstar.serve_ray.wire import error_from_wire, error_to_wire, request_to_wire  # noqa: E402
from mstar.server.state import ServerConfig  # noqa: E402
from tests.helpers.servers import free_port  # noqa: E402

pytestmark = pytest.mark.timeout(300)
on_cluster = pytest.mark.slow  # the module's cluster takes most of a minute to start

PER_REPLICA = 2  # requests one replica runs at once (its Ray max_ongoing_requests)
QUEUE = 1  # requests the ingress queues beyond the 2 x 2 running before answering 429
LONG = {"max_output_tokens": 4000}  # a stream that is still running when the test acts on it
SHORT = {"max_output_tokens": 28}


class Cluster:
    def __init__(self, base: str) -> None:
        self.base = base
        self.ingress = serve.get_app_handle(APP_NAME)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.ingress.stats.remote().result()
        return stats

    def replicas(self) -> dict[str, dict[str, Any]]:
        replicas: dict[str, dict[str, Any]] = self.stats()["replicas"]
        return replicas

    def wait(self, what: str, ok: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; stats: {json.dumps(self.stats())[:2000]}")
            time.sleep(0.2)

    def idle(self) -> None:
        self.wait("every replica idle", lambda: self.stats()["ingress_inflight"] == 0
                  and all(r["inflight"] == 0 for r in self.replicas().values()))

    def admission(self) -> dict[str, int]:
        admission: dict[str, int] = self.ingress.admission.remote().result()
        return admission

    def stream(self, text: str, kwargs: dict[str, Any], request_id: str | None = None) -> Live:
        body: dict[str, Any] = {"text": text, "streaming": True, "model_kwargs": kwargs}
        if request_id is not None:
            body["request_id"] = request_id
        return Live(requests.post(f"{self.base}/generate", json=body, stream=True, timeout=60))


class Live:
    """A streamed /generate answer, read line by line with one iterator (requests loses buffered
    bytes when a second ``iter_lines`` starts)."""

    def __init__(self, resp: requests.Response) -> None:
        self.resp = resp
        self.status_code = resp.status_code
        self.headers = resp.headers
        self._lines = (json.loads(line) for line in resp.iter_lines() if line)

    @property
    def text(self) -> str:
        """The whole body (for an answer that is not a stream: an error)."""
        return f"{self.status_code}: {self.resp.text}"

    def next(self) -> dict[str, Any]:
        return next(self._lines)

    def rest(self) -> list[dict[str, Any]]:
        return list(self._lines)

    def close(self) -> None:
        self.resp.close()

    def __enter__(self) -> Live:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK  # read by the proxy of the cluster started below
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        app = build_app("orpheus", replicas=2, num_cpus=0.5, replica_concurrency=PER_REPLICA,
                        engine_kwargs={"weights": "tiny", "max_batch_size": PER_REPLICA, "device": "cpu"},
                        server_config=ServerConfig(max_queue=QUEUE, retry_after_s=2.0))
        deploy(app, host="127.0.0.1", port=port)
        c = Cluster(f"http://127.0.0.1:{port}")
        c.wait("both replicas to report", lambda: len(c.replicas()) == 2)
        # The ingress's Ray router starts with its first request and learns the replicas from the controller.
        warm = requests.post(f"{c.base}/generate", json={"text": "warm up", "streaming": False, "model_kwargs": SHORT},
                             timeout=120)
        assert warm.status_code == 200, warm.text
        yield c
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.pop(PROXY_CALLBACK_ENV, None)


@on_cluster
def test_ready_answers_200_while_the_replicas_are_up(cluster: Cluster) -> None:
    resp = requests.get(f"{cluster.base}/ready", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ready", "model": "orpheus"}
    assert requests.get(f"{cluster.base}/describe", timeout=10).json()["engine"]["sizing"]["max_batch_size"] == PER_REPLICA
    metrics = requests.get(f"{cluster.base}/metrics", timeout=10)
    assert metrics.status_code == 200 and 'mstar_kv_slots_total{model="orpheus"} 4.0' in metrics.text  # 2 replicas x 2


@on_cluster
def test_concurrent_requests_are_served_by_both_replicas_through_the_same_routes(cluster: Cluster) -> None:
    def one(i: int) -> tuple[str, str, list[dict[str, Any]]]:
        rid = f"both-{i}"
        with cluster.stream(f"hello number {i}", SHORT, rid) as resp:
            assert resp.status_code == 200, resp.text
            assert resp.headers["X-Request-Id"] == rid  # one header: Ray's proxy copy is dropped
            return rid, resp.headers[REPLICA_HEADER], resp.rest()

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    # 4 at once and room for 2 on each replica: both must run some.
    assert {replica for _, replica, _ in results} == set(cluster.replicas())
    for rid, _, lines in results:
        assert [d["modality"] for d in lines[:-1]] and {d["modality"] for d in lines[:-1]} == {"audio"}
        assert lines[-1]["modality"] == "done" and lines[-1]["metadata"]["request_id"] == rid
    whole = requests.post(f"{cluster.base}/generate", json={"text": "hi", "streaming": False, "model_kwargs": SHORT},
                          timeout=60)
    assert whole.status_code == 200 and whole.json()["finish_reason"] == "length"
    assert whole.headers[REPLICA_HEADER] in cluster.replicas()
    cluster.idle()


@on_cluster
def test_the_openai_speech_route_answers_a_whole_wav_through_a_replica(cluster: Cluster) -> None:
    import io
    import wave

    body = {"model": "orpheus", "input": "Hello there", "voice": "tara", "response_format": "wav",
            "max_output_tokens": 28}
    resp = requests.post(f"{cluster.base}/v1/audio/speech", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers[REPLICA_HEADER] in cluster.replicas()
    with wave.open(io.BytesIO(resp.content)) as wav:  # the header's sizes are the data's
        assert wav.getnframes() > 0 and wav.getnframes() * wav.getsampwidth() == len(resp.content) - 44
    # A pass-through kwarg is checked by the model's own rule at the ingress, before any replica runs.
    bad = requests.post(f"{cluster.base}/v1/audio/speech", json={**body, "top_p": "high"}, timeout=30)
    assert bad.status_code == 400 and "top_p" in bad.text
    cluster.idle()


@on_cluster
def test_bad_input_is_refused_by_the_replica_with_the_engines_typed_error(cluster: Cluster) -> None:
    resp = requests.post(f"{cluster.base}/generate", json={"text": "hi", "model_kwargs": {"bogus": 1}}, timeout=30)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "unknown_parameter"


@on_cluster
def test_a_stream_the_client_drops_is_cancelled_on_its_replica(cluster: Cluster) -> None:
    before = {rid: len(r["cancel_latencies"]) for rid, r in cluster.replicas().items()}
    resp = cluster.stream("a long one that nobody listens to", LONG)
    assert resp.status_code == 200
    replica = resp.headers[REPLICA_HEADER]
    assert resp.next()["modality"] == "audio"
    resp.close()  # the client goes away mid-stream
    cluster.wait("the replica to cancel the dropped stream",
                 lambda: len(cluster.replicas()[replica]["cancel_latencies"]) == before[replica] + 1)
    steps, _seconds = cluster.replicas()[replica]["cancel_latencies"][-1]
    assert steps <= 1  # stopped within one model step of the cancel reaching the engine
    cluster.idle()


@on_cluster
def test_cancel_by_id_stops_the_request_on_whichever_replica_runs_it(cluster: Cluster) -> None:
    with cluster.stream("cancel me by id", LONG, "by-id-1") as resp:
        assert resp.status_code == 200
        replica = resp.headers[REPLICA_HEADER]
        before = len(cluster.replicas()[replica]["cancel_latencies"])
        resp.next()
        answer = requests.post(f"{cluster.base}/cancel/by-id-1", timeout=10).json()
        assert answer == {"request_id": "by-id-1", "cancelled": True, "status": "cancelled"}
        rest = resp.rest()
    assert rest[-1]["modality"] == "done" and rest[-1]["metadata"]["finish_reason"] == "cancelled"
    cluster.wait("the replica's engine to count the cancel",
                 lambda: len(cluster.replicas()[replica]["cancel_latencies"]) == before + 1)
    cluster.idle()


@on_cluster
def test_a_full_system_answers_429_with_retry_after_before_any_body(cluster: Cluster) -> None:
    capacity = 2 * PER_REPLICA
    running = [cluster.stream(f"filler {i}", LONG, f"fill-{i}") for i in range(capacity)]
    try:
        assert all(r.status_code == 200 for r in running)
        with cf.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(lambda: cluster.stream("queued", SHORT, "fill-queued"))  # waits for a slot
            cluster.wait("the queued request to wait at the ingress", lambda: cluster.admission()["waiting"] == QUEUE)
            refused = requests.post(f"{cluster.base}/generate", json={"text": "one too many", "model_kwargs": SHORT},
                                    timeout=30)
            assert refused.status_code == 429
            assert refused.headers["Retry-After"] == "2"
            assert refused.json()["error"]["code"] == RateLimitError.code
            for r in running:
                requests.post(f"{cluster.base}/cancel/{r.headers['X-Request-Id']}", timeout=10)
            with queued.result() as late:
                assert late.status_code == 200 and late.rest()[-1]["modality"] == "done"
    finally:
        for r in running:
            r.close()
    cluster.idle()


@on_cluster
def test_killing_a_replica_fails_only_its_own_requests_and_the_other_keeps_serving(cluster: Cluster) -> None:
    streams = [cluster.stream(f"victim or survivor {i}", LONG, f"kill-{i}") for i in range(2 * PER_REPLICA)]
    try:
        by_replica: dict[str, list[Live]] = {}
        for resp in streams:
            assert resp.status_code == 200
            by_replica.setdefault(resp.headers[REPLICA_HEADER], []).append(resp)
            resp.next()
        victim, survivor = sorted(by_replica)
        ray.kill(ray.get_actor(cluster.replicas()[victim]["actor"], namespace="serve"), no_restart=True)
        for resp in by_replica[victim]:
            last = resp.rest()[-1]
            assert last["modality"] == "error", last
            assert last["metadata"]["code"] == ReplicaFailedError.code and last["metadata"]["status"] == 503
        for resp in by_replica[survivor]:  # still streaming: the next line is more audio, not an error
            assert resp.next()["modality"] == "audio"
            requests.post(f"{cluster.base}/cancel/{resp.headers['X-Request-Id']}", timeout=10)
        after = requests.post(f"{cluster.base}/generate", json={"text": "still here", "streaming": False,
                                                                "model_kwargs": SHORT}, timeout=60)
        assert after.status_code == 200 and after.json()["finish_reason"] == "length"
        assert requests.get(f"{cluster.base}/ready", timeout=10).status_code == 200
    finally:
        for resp in streams:
            resp.close()


# ---------------------------------------------------------------- without a cluster


def test_scaling_passes_autoscaling_settings_through_to_ray_serve() -> None:
    assert Scaling(3).deployment_options() == {"num_replicas": 3}
    auto = Scaling(2, min_replicas=1, max_replicas=4, target_ongoing_requests=8).check()
    assert auto.deployment_options() == {"autoscaling_config": {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 8}}
    assert auto.most == 4


@pytest.mark.parametrize("bad", [Scaling(0), Scaling(5, max_replicas=4), Scaling(1, min_replicas=2),
                                 Scaling(1, target_ongoing_requests=0)])
def test_impossible_replica_counts_are_refused_with_a_typed_error(bad: Scaling) -> None:
    with pytest.raises(InvalidParameterError):
        bad.check()


def test_an_error_crosses_the_handle_as_its_wire_form_and_comes_back_as_its_class() -> None:
    back = error_from_wire(error_to_wire(UnknownVoiceError("nobody", ["tara", "zoe"])))
    assert type(back) is UnknownVoiceError and "nobody" in str(back) and back.param == "voice"
    busy = error_from_wire(error_to_wire(RateLimitError("full", retry_after=3.0)))
    assert isinstance(busy, RateLimitError) and busy.retry_after == 3.0
    assert error_class_for_code("replica_failed", 503) is ReplicaFailedError


def test_media_paths_are_read_on_the_ingress_and_sent_as_bytes(tmp_path: Any) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF-not-really")
    wire = request_to_wire({"text": "hi", "audio": [str(clip)], "images": None})
    assert wire["audio"] == [("clip.wav", b"RIFF-not-really")] and wire["images"] is None
    with pytest.raises(MediaError):
        request_to_wire({"audio": str(tmp_path / "missing.wav")})


def test_ray_refusals_and_deaths_become_typed_errors() -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    engine = RemoteEngine("orpheus", _NoHandle(), retry_after=2.0)  # type: ignore[arg-type]
    busy = engine.failure(BackPressureError(num_queued_requests=3, max_queued_requests=3), None, "r1")
    assert isinstance(busy, RateLimitError) and busy.retry_after == 2.0
    died = engine.failure(ActorDiedError(), "abc", "r1")
    assert isinstance(died, ReplicaFailedError) and "abc" in str(died)


def test_health_needs_one_fresh_healthy_replica_report() -> None:
    engine = RemoteEngine("orpheus", _NoHandle())  # type: ignore[arg-type]
    assert engine.health() == "no replica has reported ready yet"
    assert engine.stats()["waiting"] == 0 and engine.stats()["replicas"] == {}  # /metrics reads these meanwhile
    report = {"replica": "a", "health": "a tensor-parallel worker died", "stats": {"steps": 1}}
    engine.record_report(report)
    assert "a tensor-parallel worker died" in (engine.health() or "")
    engine.record_report({**report, "replica": "b", "health": None, "stats": {"steps": 2}})
    assert engine.health() is None
    assert engine.stats()["steps"] == 3 and set(engine.stats()["replicas"]) == {"a", "b"}


class _NoHandle:
    """A DeploymentHandle stand-in for what needs no replica."""

    def options(self, **_: Any) -> _NoHandle:
        return self


def test_the_cli_refuses_an_impossible_replica_count(capsys: pytest.CaptureFixture[str]) -> None:
    from mstar.server.cli import main

    assert main(["--model", "orpheus", "--replicas", "3", "--max-replicas", "2"]) == 2
    assert "--replicas: replicas (3) must lie between" in capsys.readouterr().err
