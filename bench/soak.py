"""Soak test: a mixed, partly cancelled, partly rejected request load against real mstar servers.

One server per model, on 127.0.0.1 only. The load mixes native ``/generate``
(NDJSON stream and JSON) with the OpenAI routes each model offers (chat, speech,
SSE and not). About a quarter of the requests are cancelled at a random
moment, half of those by ``POST /cancel/{id}`` and half by dropping the
connection; more clients than ``--max-concurrent + --max-queue`` make the
servers answer 429. Afterwards it reports what was lost, if anything:

* completed / cancelled / rejected (429) counts, unexpected 5xx (HTTP or in-band);
* p50 / p99 latency of completed requests;
* cancel-to-stop latency (engine side, in model steps and ms; client side in ms);
* KV slots / pages still held, files left in the upload dirs;
* server RSS before and after.

Run it in-process (uvicorn threads in this process; what the test suite does)
or against ``mstar-server`` subprocesses (``--spawn``; the real CLI with one
extra read-only route, ``GET /soak/stats``, that exposes ``engine.stats()``)::

    python bench/soak.py --models pi05,bagel,orpheus,vjepa2 --requests 2000 --duration 540 --spawn

Only loopback is ever contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/soak.py` from a checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The load driver is shared with the test suite and lives there (tests/helpers/soak.py), so that no test
# imports this benchmark; this module adds the CLI, the mstar-server subprocesses and their stats route.
from tests.helpers.media import make_mp4, make_png, make_wav  # noqa: E402
from tests.helpers.soak import (  # noqa: E402
    MODEL_PLANS,
    STATS_PATH,
    InProcessServer,
    ServerBase,
    SoakConfig,
    SoakReport,
    _get,
    held_resources,
    rss_kb,
    run_soak,
)

__all__ = [
    "MODEL_PLANS",
    "InProcessServer",
    "SoakConfig",
    "SoakReport",
    "SpawnedServer",
    "held_resources",
    "make_mp4",
    "make_png",
    "make_wav",
    "run_soak",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SpawnedServer(ServerBase):
    """The ``mstar-server`` CLI in a subprocess (plus ``GET /soak/stats``)."""

    def __init__(self, model: str, *, weights: str, upload_dir: Path, max_concurrent: int, max_queue: int,
                 imports: list[str], log_path: Path) -> None:
        self.model = model
        self.upload_dir = upload_dir
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, str(Path(__file__).resolve()), "serve", *sum((["--import", m] for m in imports), []), "--",
                "--model", model, "--weights", weights, "--host", "127.0.0.1", "--port", str(port),
                "--upload-dir", str(upload_dir), "--max-concurrent", str(max_concurrent), "--max-queue", str(max_queue),
                "--log-level", "warning"]
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))

    def start(self, timeout: float = 300.0) -> SpawnedServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mstar-server for {self.model} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                status, _ = _get(self.port, "/ready")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"mstar-server for {self.model} was not ready after {timeout} s")

    def stats(self) -> dict[str, Any]:
        status, body = _get(self.port, STATS_PATH)
        if status != 200:
            raise RuntimeError(f"GET {STATS_PATH} answered {status}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

    @property
    def rss_key(self) -> str:
        return f"{self.model} (pid {self.proc.pid})"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


# --------------------------------------------------------------------------- CLI


def _serve(argv: list[str]) -> int:
    """``soak.py serve [--import MOD]... -- <mstar-server flags>``: the real CLI plus ``GET /soak/stats``."""
    import importlib

    imports: list[str] = []
    while argv and argv[0] == "--import":
        imports.append(argv[1])
        argv = argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    for name in imports:
        importlib.import_module(name)

    from litestar import Request, get

    import mstar.server
    from mstar.server import cli

    @get(STATS_PATH, sync_to_thread=False)
    def soak_stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """engine.stats() plus the server's admission counters (read-only)."""
        state = request.app.state["mstar"]
        st = dict(state.holder.engine.stats())
        adm = state.admission.stats()
        st["admission_running"], st["admission_waiting"] = adm["running"], adm["waiting"]
        st["pid"] = os.getpid()
        return st

    original = mstar.server.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.register(soak_stats)
        return app

    mstar.server.create_app = create_app  # type: ignore[assignment]
    return cli.main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="pi05,bagel,vjepa2", help="comma-separated model families, one server each")
    p.add_argument("--weights", default="tiny", help="weights for every model")
    p.add_argument("--requests", type=int, default=200, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=120.0, help="stop sending new requests after this many seconds")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--max-concurrent", type=int, default=2, help="server --max-concurrent (small, so 429s happen)")
    p.add_argument("--max-queue", type=int, default=1, help="server --max-queue (small, so 429s happen)")
    p.add_argument("--cancel-fraction", type=float, default=0.25, help="share of requests cancelled (route or disconnect)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reject-pause", type=float, default=0.05, help="seconds a client pauses after a 429 (randomised; at least half a request's expected time)")
    p.add_argument("--spawn", action="store_true", help="run each server as an mstar-server subprocess (else in-process)")
    p.add_argument("--import", dest="imports", action="append", default=[],
                   help="module to import first (registers extra models, e.g. tests.helpers.fakes for 'fake')")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    import importlib
    import logging

    logging.getLogger("mstar.server").setLevel(logging.WARNING)  # one INFO line per dropped client drowns the report

    for name in args.imports:
        importlib.import_module(name)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_PLANS]
    if unknown:
        print(f"soak: no request plan for {unknown}; known: {sorted(MODEL_PLANS)}", file=sys.stderr)
        return 2
    cfg = SoakConfig(models=models, requests=args.requests, duration_s=args.duration, clients=args.clients,
                     cancel_fraction=args.cancel_fraction, seed=args.seed, reject_pause_s=args.reject_pause)
    work = Path(tempfile.mkdtemp(prefix="mstar-soak-"))
    servers: list[Any] = []
    try:
        for model in models:
            up = work / f"uploads-{model}"
            up.mkdir()
            if args.spawn:
                servers.append(SpawnedServer(model, weights=args.weights, upload_dir=up, max_concurrent=args.max_concurrent,
                                             max_queue=args.max_queue, imports=args.imports, log_path=work / f"{model}.log"))
            else:
                from mstar.engine import Engine

                servers.append(InProcessServer(Engine(model, weights=args.weights), upload_dir=up,
                                               max_concurrent=args.max_concurrent, max_queue=args.max_queue))
        for srv in servers:
            srv.start()
        report = run_soak(servers, cfg)
    finally:
        for srv in servers:
            srv.close()
            if isinstance(srv, InProcessServer):
                srv.engine.close()
    report.config.update(spawn=args.spawn, max_concurrent=args.max_concurrent, max_queue=args.max_queue,
                         weights=args.weights, command="python bench/soak.py " + " ".join(argv))
    print(report.summary())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=1))
    ok = (report.unexpected_5xx == 0 and report.other_errors == 0 and report.held_total == 0 and report.leftover_total == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
