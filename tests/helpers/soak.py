"""The soak driver: a mixed, partly cancelled, partly rejected request load against running mstar servers.

Shared by tests/test_reliability_soak.py (in-process servers, ~200 requests) and the ``bench/soak.py``
CLI (the long run, optionally against ``mstar-server`` subprocesses); see docs/reliability.md.
It lives with the tests so that no test imports the benchmark package: the benchmark imports it.

The load mixes native ``/generate`` (NDJSON stream and JSON) with the OpenAI routes each model
offers (chat, speech, images; SSE and not). A share of the requests is cancelled at a random moment,
half by ``POST /cancel/{id}`` and half by dropping the connection. :func:`run_soak` reports what was
lost, if anything: unexpected 5xx, held KV slots / pages, leftover uploads, RSS growth, and latency
and cancel-to-stop percentiles. Only loopback is ever contacted.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.helpers.media import make_mp4, make_png, make_wav

__all__ = [
    "MODEL_PLANS",
    "STATS_PATH",
    "InProcessServer",
    "Outcome",
    "ServerBase",
    "SoakConfig",
    "SoakReport",
    "build_job",
    "held_resources",
    "kinds_for",
    "percentiles",
    "rss_kb",
    "run_job",
    "run_soak",
]

#: The read-only route ``bench/soak.py serve`` adds to ``mstar-server``: ``engine.stats()`` plus admission counters.
STATS_PATH = "/soak/stats"


# --------------------------------------------------------------------------- what to send to each model


@dataclass(slots=True)
class Job:
    """One HTTP request of the soak, fully built."""

    model: str
    kind: str  # native_ndjson, native_json, chat_sse, chat_json, speech_bytes, speech_sse
    path: str
    body: bytes
    headers: dict[str, str]
    protocol: str  # ndjson | json | sse | bytes
    request_id: str | None  # known up front (native) or learnt from the response
    action: str = "complete"  # complete | cancel_route | disconnect
    cancel_at: float = 0.0  # seconds after sending


@dataclass(slots=True)
class ModelPlan:
    """How to build valid, short requests for one model."""

    native: Callable[[random.Random], tuple[dict[str, Any], list[tuple[str, bytes]]]]
    chat: dict[str, Any] | None = None  # extra body fields of a chat request (None: no chat surface)
    speech: dict[str, Any] | None = None  # extra body fields of a speech request (None: no speech surface)
    images: dict[str, Any] | None = None  # extra body fields of an image generation (None: no images surface)
    expected_s: float = 0.2  # rough duration of one request alone: the window for random cancels


def _native_text(kwargs: dict[str, Any], outputs: str = "text") -> Callable[[random.Random], tuple[dict[str, Any], list[tuple[str, bytes]]]]:
    def build(rng: random.Random) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        return {"text": f"soak {rng.randrange(10**6)} hello", "output_modalities": outputs, "model_kwargs": dict(kwargs)}, []

    return build


def _native_pi05(rng: random.Random) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    state = [round(rng.uniform(-1, 1), 3) for _ in range(4)]
    kwargs = {"robot_state": state, "num_steps": 4, "seed": rng.randrange(1000)}
    return {"text": "pick up the cube", "output_modalities": "action", "model_kwargs": kwargs}, [("cam.png", _media("png"))]


def _native_video(kwargs: dict[str, Any]) -> Callable[[random.Random], tuple[dict[str, Any], list[tuple[str, bytes]]]]:
    def build(rng: random.Random) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        return {"output_modalities": "latent", "model_kwargs": dict(kwargs)}, [("clip.mp4", _media("mp4"))]

    return build


_MEDIA: dict[str, bytes] = {}


def _media(kind: str) -> bytes:
    if kind not in _MEDIA:
        makers: dict[str, Callable[[], bytes]] = {"png": make_png, "wav": make_wav, "mp4": make_mp4}
        _MEDIA[kind] = makers[kind]()
    return _MEDIA[kind]


#: Short, valid requests per model family (tiny weights). Models not listed here cannot be soaked.
MODEL_PLANS: dict[str, ModelPlan] = {
    "fake": ModelPlan(
        native=_native_text({"max_output_tokens": 12, "step_delay": 0.01}),
        chat={"max_tokens": 12, "step_delay": 0.01},
        speech={"voice": "alpha", "max_output_tokens": 12, "step_delay": 0.01},
        expected_s=0.15,
    ),
    "orpheus": ModelPlan(
        native=_native_text({"max_output_tokens": 28}, "audio"),
        speech={"voice": "tara", "max_output_tokens": 28},
        expected_s=0.8,
    ),
    "pi05": ModelPlan(native=_native_pi05, expected_s=0.05),
    "bagel": ModelPlan(native=_native_text({"max_output_tokens": 8}), chat={"max_tokens": 8},
                       images={"size": "32x32", "num_timesteps": 2}, expected_s=0.15),
    "qwen3_omni": ModelPlan(
        native=_native_text({"max_output_tokens": 6}), chat={"max_tokens": 6},
        speech={"voice": "Ethan", "max_output_tokens": 4, "talker_max_output_tokens": 24}, expected_s=0.3
    ),
    "vjepa2": ModelPlan(native=_native_video({}), expected_s=0.03),
    "vjepa2_ac": ModelPlan(native=_native_video({"mode": "encode"}), expected_s=0.05),
}


def _multipart(fields: dict[str, Any], files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(text.encode() + b"\r\n")
    for filename, data in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def build_job(model: str, kinds: list[str], rng: random.Random) -> Job:
    """A random valid request for ``model`` among ``kinds``."""
    plan = MODEL_PLANS[model]
    kind = rng.choice(kinds)
    if kind.startswith("native"):
        fields, files = plan.native(rng)
        rid = f"soak-{uuid.uuid4().hex[:16]}"
        fields.update(streaming="true" if kind == "native_ndjson" else "false", request_id=rid)
        body, ctype = _multipart(fields, files)
        return Job(model, kind, "/generate", body, {"Content-Type": ctype}, "ndjson" if kind == "native_ndjson" else "json", rid)
    if kind.startswith("chat"):
        doc = {"model": model, "messages": [{"role": "user", "content": f"hi {rng.randrange(1000)}"}], **(plan.chat or {})}
        doc["stream"] = kind == "chat_sse"
        return Job(model, kind, "/v1/chat/completions", json.dumps(doc).encode(), {"Content-Type": "application/json"},
                   "sse" if kind == "chat_sse" else "json", None)
    if kind == "images":
        doc = {"model": model, "prompt": f"a red cube {rng.randrange(1000)}", **(plan.images or {})}
        return Job(model, kind, "/v1/images/generations", json.dumps(doc).encode(), {"Content-Type": "application/json"},
                   "json", None)
    doc = {"model": model, "input": f"hello number {rng.randrange(1000)}", "response_format": "wav", **(plan.speech or {})}
    if kind == "speech_sse":
        doc["stream_format"] = "sse"
    return Job(model, kind, "/v1/audio/speech", json.dumps(doc).encode(), {"Content-Type": "application/json"},
               "sse" if kind == "speech_sse" else "bytes", None)


def kinds_for(model: str, has_openai: bool) -> list[str]:
    plan = MODEL_PLANS[model]
    kinds = ["native_ndjson", "native_json"]
    if has_openai and plan.chat is not None:
        kinds += ["chat_sse", "chat_json"]
    if has_openai and plan.speech is not None:
        kinds += ["speech_bytes", "speech_sse"]
    if has_openai and plan.images is not None:
        kinds += ["images"]
    return kinds


# --------------------------------------------------------------------------- servers


def rss_kb(pid: int | None = None) -> int:
    """VmRSS of a process (this one by default), in KiB."""
    text = Path(f"/proc/{pid or 'self'}/status").read_text()
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def held_resources(stats: dict[str, Any]) -> dict[str, int]:
    """The entries of ``engine.stats()`` that count things a request holds (slots, pages, in-flight)."""
    held: dict[str, int] = {}
    for key, value in stats.items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key in ("inflight", "waiting", "active") or key.endswith(("_held", "_used", "_in_use")):
            held[key] = value
    return held


class ServerBase:
    model: str
    url: str
    upload_dir: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def rss_kb(self) -> int:
        raise NotImplementedError

    def has_openai(self) -> bool:
        status, body = _get(self.port, "/v1/models")
        return status == 200 and bool(json.loads(body).get("data"))

    def leftover_files(self) -> list[str]:
        return sorted(p.name for p in self.upload_dir.iterdir()) if self.upload_dir.exists() else []

    def wait_idle(self, timeout: float = 15.0) -> dict[str, Any]:
        """Stats once nothing is in flight (or whatever they are at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            held = held_resources(st)
            if not any(held.values()) or time.monotonic() > deadline:
                return st
            time.sleep(0.05)


class InProcessServer(ServerBase):
    """``create_app(engine)`` served by uvicorn on a thread of this process."""

    def __init__(self, engine: Any, *, upload_dir: Path, max_concurrent: int, max_queue: int, **settings: Any) -> None:
        import uvicorn

        from mstar.server import create_app

        self.engine = engine
        self.model = engine.info.name
        self.upload_dir = upload_dir
        self.app = create_app(engine, upload_dir=upload_dir, max_concurrent=max_concurrent, max_queue=max_queue, **settings)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", lifespan="on", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name=f"soak-{self.model}")

    def start(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn for {self.model} did not start")
            time.sleep(0.02)
        return self

    def stats(self) -> dict[str, Any]:
        st = dict(self.engine.stats())
        adm = self.app.state["mstar"].admission.stats()
        st["admission_running"], st["admission_waiting"] = adm["running"], adm["waiting"]
        return st

    def rss_kb(self) -> int:
        return rss_kb()

    @property
    def rss_key(self) -> str:
        return "this process (all in-process servers)"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _post(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=b"", headers={"Content-Length": "0"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- one request


@dataclass(slots=True)
class Outcome:
    model: str
    kind: str
    action: str
    result: str  # completed | cancelled_route | cancelled_disconnect | cancel_late | rejected | error_5xx | error_4xx | error_other
    status: int | None
    latency_s: float
    cancel_to_end_s: float | None = None
    detail: str = ""


def _inband_error(protocol: str, line: bytes) -> str | None:
    """An error reported inside a stream, if ``line`` is one."""
    text = line.strip()
    if protocol == "sse":
        if not text.startswith(b"data:") or text == b"data: [DONE]":
            return None
        text = text[5:].strip()
    if not text.startswith(b"{"):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return "unparseable stream line"
    if protocol == "ndjson" and doc.get("modality") == "error":
        return json.dumps(doc.get("metadata"))
    if protocol == "sse" and "error" in doc:
        return json.dumps(doc["error"])
    return None


def run_job(job: Job, port: int, read_timeout: float = 120.0) -> Outcome:
    """Send one request, cancel or drop it at ``job.cancel_at`` when asked, and classify what happened."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=read_timeout)
    fired = threading.Event()
    cancel_info: dict[str, Any] = {}
    timers: list[threading.Timer] = []
    rid_box = {"rid": job.request_id}

    def drop() -> None:
        fired.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel() -> None:
        rid = rid_box["rid"]
        if rid is None:
            return
        fired.set()
        cancel_info["t"] = time.perf_counter()
        try:
            status, body = _post(port, f"/cancel/{quote(rid, safe='')}")
            cancel_info["status"] = status
            cancel_info["found"] = status == 200 and bool(json.loads(body).get("cancelled"))
        except OSError as exc:
            cancel_info["error"] = repr(exc)

    def schedule(fn: Callable[[], None], delay: float) -> None:
        timer = threading.Timer(max(0.0, delay), fn)
        timer.daemon = True
        timers.append(timer)
        timer.start()

    def settle() -> None:
        # Stop timers that have not fired; wait for a cancel already under way, so its answer is known.
        for timer in timers:
            timer.cancel()
            timer.join(30)

    def done(result: str, status: int | None, detail: str = "") -> Outcome:
        settle()
        conn.close()
        if result not in ("error_5xx", "error_other") and cancel_info.get("status", 200) >= 500:
            result, detail = "error_5xx", f"POST /cancel answered {cancel_info['status']}"
        elif result not in ("error_5xx", "error_other") and "error" in cancel_info:
            result, detail = "error_other", f"POST /cancel failed: {cancel_info['error']}"
        end = time.perf_counter()
        c2e = end - cancel_info["t"] if "t" in cancel_info else None
        return Outcome(job.model, job.kind, job.action, result, status, end - t0, c2e, detail[:300])

    try:
        conn.request("POST", job.path, body=job.body, headers={**job.headers, "Connection": "close"})
        sock = conn.sock
        if job.action == "disconnect":
            schedule(drop, job.cancel_at)
        elif job.action == "cancel_route" and job.request_id is not None:
            schedule(cancel, job.cancel_at)
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        if fired.is_set():
            return done("cancelled_disconnect" if job.action == "disconnect" else "cancel_late", None)
        return done("error_other", None, f"send/headers: {exc!r}")
    status = resp.status
    if status != 200:
        try:
            text = resp.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            text = f"(body unreadable: {exc!r})"
        if status == 429:
            retry = resp.getheader("Retry-After")
            return done("rejected" if retry else "error_4xx", status, "" if retry else "429 without Retry-After")
        return done("error_5xx" if status >= 500 else "error_4xx", status, text)
    if job.action == "cancel_route" and rid_box["rid"] is None:
        header = resp.getheader("X-Request-Id")
        if header:
            rid_box["rid"] = header
            schedule(cancel, job.cancel_at - (time.perf_counter() - t0))
    finish_reason: str | None = None
    inband: str | None = None
    chunks: list[bytes] = []
    try:
        if job.protocol in ("ndjson", "sse"):
            while True:
                line = resp.readline()
                if not line:
                    break
                chunks.append(line)
                err = _inband_error(job.protocol, line)
                if err is not None:
                    inband = err
                if job.protocol == "ndjson" and b'"modality":"done"' in line:
                    finish_reason = json.loads(line)["metadata"]["finish_reason"]
                if job.protocol == "sse" and rid_box["rid"] is None and line.startswith(b"data: {"):
                    doc = json.loads(line[5:])
                    if str(doc.get("id", "")).startswith("chatcmpl-"):
                        rid_box["rid"] = doc["id"][len("chatcmpl-"):]
                        if job.action == "cancel_route":
                            schedule(cancel, job.cancel_at - (time.perf_counter() - t0))
        else:
            chunks.append(resp.read())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if job.action == "disconnect" and fired.is_set():
            return done("cancelled_disconnect", status)
        return done("error_other", status, f"reading: {exc!r}")
    body = b"".join(chunks)
    settle()
    if inband is not None:
        return done("error_5xx" if '"status": 5' in inband or "status" not in inband else "error_4xx", status, f"in-band: {inband}")
    if job.action == "disconnect" and fired.is_set():
        # The drop raced with the end of the response: only a complete body counts as completed.
        complete = _complete(job, body, finish_reason)
        return done("cancel_late" if complete else "cancelled_disconnect", status)
    if job.action == "cancel_route" and fired.is_set():
        if job.protocol == "ndjson" and finish_reason not in (None, "cancelled"):
            return done("cancel_late", status)
        if cancel_info.get("found") or finish_reason == "cancelled":
            return done("cancelled_route", status)
        return done("cancel_late", status)
    if finish_reason == "cancelled":
        return done("error_other", status, "cancelled without being asked to")
    if not _complete(job, body, finish_reason):
        return done("error_other", status, f"incomplete {job.protocol} body ({len(body)} bytes)")
    return done("completed", status)


def _complete(job: Job, body: bytes, finish_reason: str | None) -> bool:
    if job.protocol == "ndjson":
        return finish_reason is not None
    if job.protocol == "sse":
        return b"data: [DONE]" in body or b'"speech.audio.done"' in body
    if job.protocol == "json":
        try:
            doc = json.loads(body)
        except ValueError:
            return False
        return isinstance(doc, dict) and ("choices" in doc or "finish_reason" in doc or "outputs" in doc or "data" in doc)
    return len(body) > 44 if job.kind.startswith("speech") else len(body) > 0


# --------------------------------------------------------------------------- the run


@dataclass(slots=True)
class SoakConfig:
    models: list[str]
    requests: int = 200
    duration_s: float = 60.0
    clients: int = 8
    cancel_fraction: float = 0.25
    seed: int = 0
    read_timeout_s: float = 120.0
    reject_pause_s: float = 0.05
    warmup: bool = True  # one request of every kind per model before measuring (RSS, latency)


@dataclass(slots=True)
class SoakReport:
    config: dict[str, Any]
    sent: int = 0
    wall_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    latency_ms_by_kind: dict[str, dict[str, float | None]] = field(default_factory=dict)
    cancel_stop_steps: dict[str, float | None] = field(default_factory=dict)
    cancel_stop_ms: dict[str, float | None] = field(default_factory=dict)
    cancel_client_ms: dict[str, float | None] = field(default_factory=dict)
    cancels_measured: int = 0
    cancels_after_stop: int = 0
    held_after: dict[str, dict[str, int]] = field(default_factory=dict)
    leftover_files: dict[str, list[str]] = field(default_factory=dict)
    rss_kb_before: dict[str, int] = field(default_factory=dict)
    rss_kb_after: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def unexpected_5xx(self) -> int:
        return self.counts.get("error_5xx", 0)

    @property
    def other_errors(self) -> int:
        return self.counts.get("error_4xx", 0) + self.counts.get("error_other", 0)

    @property
    def cancelled(self) -> int:
        return self.counts.get("cancelled_route", 0) + self.counts.get("cancelled_disconnect", 0)

    @property
    def held_total(self) -> int:
        return sum(v for held in self.held_after.values() for v in held.values())

    @property
    def leftover_total(self) -> int:
        return sum(len(v) for v in self.leftover_files.values())

    @property
    def rss_growth_kb(self) -> int:
        return max((self.rss_kb_after[k] - self.rss_kb_before.get(k, 0) for k in self.rss_kb_after), default=0)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(unexpected_5xx=self.unexpected_5xx, cancelled=self.cancelled, held_total=self.held_total,
                   leftover_total=self.leftover_total, rss_growth_kb=self.rss_growth_kb)
        return doc

    def summary(self) -> str:
        c = self.counts
        lines = [
            f"requests sent        {self.sent} in {self.wall_s:.1f} s over {', '.join(self.config['models'])}",
            f"completed            {c.get('completed', 0)}",
            f"cancelled            {self.cancelled} (route {c.get('cancelled_route', 0)}, disconnect "
            f"{c.get('cancelled_disconnect', 0)}; {c.get('cancel_late', 0)} finished before the cancel landed)",
            f"rejected (429)       {c.get('rejected', 0)}",
            f"unexpected 5xx       {self.unexpected_5xx}",
            f"other errors         {self.other_errors}",
            f"latency ms           p50 {_fmt(self.latency_ms.get('p50'))}  p99 {_fmt(self.latency_ms.get('p99'))}",
            f"cancel->stop steps   p50 {_fmt(self.cancel_stop_steps.get('p50'))}  p99 {_fmt(self.cancel_stop_steps.get('p99'))}"
            f"  max {_fmt(self.cancel_stop_steps.get('max'))}  ({self.cancels_measured} cancels stopped a running or queued"
            f" request; {self.cancels_after_stop} came after it had stopped)",
            f"cancel->stop ms      p50 {_fmt(self.cancel_stop_ms.get('p50'))}  p99 {_fmt(self.cancel_stop_ms.get('p99'))}"
            f"  (client: POST /cancel -> stream end p50 {_fmt(self.cancel_client_ms.get('p50'))}"
            f" p99 {_fmt(self.cancel_client_ms.get('p99'))})",
            f"held after run       {self.held_total}  {json.dumps(self.held_after)}",
            f"leftover uploads     {self.leftover_total}",
            "server RSS MiB       " + ", ".join(
                f"{m}: {self.rss_kb_before.get(m, 0) / 1024:.0f} -> {self.rss_kb_after[m] / 1024:.0f}" for m in self.rss_kb_after),
        ]
        for err in self.errors[:10]:
            lines.append(f"  error: {err}")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max (nearest-rank), or None when there are no values."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

    return {"p50": rank(50), "p99": rank(99), "max": s[-1]}


def _warmup(servers: list[Any], kinds: dict[str, list[str]], rng: random.Random, read_timeout: float) -> None:
    for srv in servers:
        for kind in kinds[srv.model]:
            out = run_job(build_job(srv.model, [kind], rng), srv.port, read_timeout)
            if out.result != "completed":
                raise RuntimeError(f"warm-up {srv.model}/{kind} did not complete: {out.result} {out.status} {out.detail}")


def run_soak(servers: list[Any], cfg: SoakConfig) -> SoakReport:
    """Drive the load against started servers (one per model) and gather the report."""
    rng = random.Random(cfg.seed)
    kinds = {srv.model: kinds_for(srv.model, srv.has_openai()) for srv in servers}
    if cfg.warmup:
        _warmup(servers, kinds, rng, cfg.read_timeout_s)
    for srv in servers:
        srv.wait_idle()
    report = SoakReport(config={**asdict(cfg), "kinds": kinds})
    before_cancels = {srv.model: len(srv.stats()["cancel_latencies"]) for srv in servers}
    report.rss_kb_before = {srv.rss_key: srv.rss_kb() for srv in servers}

    lock = threading.Lock()
    counter = {"n": 0}
    outcomes: list[Outcome] = []
    start = time.monotonic()
    deadline = start + cfg.duration_s

    def next_job() -> tuple[Job, Any] | None:
        with lock:
            if counter["n"] >= cfg.requests or time.monotonic() > deadline:
                return None
            i = counter["n"]
            counter["n"] += 1
        r = random.Random(cfg.seed * 1_000_003 + i)
        srv = servers[i % len(servers)]
        job = build_job(srv.model, kinds[srv.model], r)
        if r.random() < cfg.cancel_fraction:
            job.action = "cancel_route" if r.random() < 0.5 else "disconnect"
            if job.kind in ("chat_json", "images"):
                job.action = "disconnect"  # the client never learns these requests' ids: it can only hang up
            job.cancel_at = r.uniform(0.0, MODEL_PLANS[srv.model].expected_s * 1.5)
        return job, srv

    def worker() -> None:
        while True:
            item = next_job()
            if item is None:
                return
            job, srv = item
            try:
                out = run_job(job, srv.port, cfg.read_timeout_s)
            except Exception as exc:  # the harness itself must not lose a request silently
                out = Outcome(job.model, job.kind, job.action, "error_other", None, 0.0, None, f"harness: {exc!r}")
            with lock:
                outcomes.append(out)
            if out.result == "rejected" and cfg.reject_pause_s > 0:
                # A client told to retry later backs off a little (not the full Retry-After: keep the pressure on).
                time.sleep(random.uniform(0.5, 1.5) * max(cfg.reject_pause_s, MODEL_PLANS[job.model].expected_s / 2))

    threads = [threading.Thread(target=worker, name=f"soak-client-{k}", daemon=True) for k in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.wall_s = time.monotonic() - start
    report.sent = len(outcomes)

    for out in outcomes:
        report.counts[out.result] = report.counts.get(out.result, 0) + 1
        per = report.by_kind.setdefault(f"{out.model}/{out.kind}", {})
        per[out.result] = per.get(out.result, 0) + 1
        if out.result in ("error_5xx", "error_4xx", "error_other"):
            report.errors.append(f"{out.model}/{out.kind}/{out.action}: {out.result} {out.status} {out.detail}")
    lat = percentiles([o.latency_s * 1000 for o in outcomes if o.result == "completed"])
    report.latency_ms = {"p50": lat["p50"], "p99": lat["p99"]}
    for key in sorted(report.by_kind):
        model, kind = key.split("/", 1)
        report.latency_ms_by_kind[key] = percentiles(
            [o.latency_s * 1000 for o in outcomes if o.result == "completed" and o.model == model and o.kind == kind])
    report.cancel_client_ms = percentiles(
        [o.cancel_to_end_s * 1000 for o in outcomes if o.result == "cancelled_route" and o.cancel_to_end_s is not None]
    )

    steps: list[float] = []
    secs: list[float] = []
    for srv in servers:
        st = srv.wait_idle()
        for s, dt in st["cancel_latencies"][before_cancels[srv.model]:]:
            if dt < 0:  # the cancel landed after the request had already stopped on its own: nothing to measure
                report.cancels_after_stop += 1
                continue
            steps.append(float(s))
            secs.append(float(dt) * 1000)
        report.held_after[srv.model] = held_resources(st)
        report.leftover_files[srv.model] = srv.leftover_files()
        report.rss_kb_after[srv.rss_key] = srv.rss_kb()
    report.cancels_measured = len(steps)
    report.cancel_stop_steps = percentiles(steps)
    report.cancel_stop_ms = percentiles(secs)
    return report
