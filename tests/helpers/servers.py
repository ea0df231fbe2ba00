"""Real uvicorn servers on 127.0.0.1 for the tests.

* :class:`ServerThread` -- any ASGI app in a daemon thread of the test process;
* :class:`Served` / :func:`serving` -- one tiny model per server, with an ``openai`` client and an
  ``MStarClient`` pointed at it (behind the ``served`` fixture of tests/conftest.py);
* :func:`serve` -- ``create_app(engine, **settings)`` as the soak driver's :class:`InProcessServer`
  (stats, ``wait_idle``, leftover uploads).

Fake model families are not registered here: request the ``fake_models`` fixture.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mstar.engine import Engine
from tests.helpers.soak import InProcessServer

__all__ = ["InProcessServer", "Served", "ServerThread", "free_port", "serve", "serving"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread of the test process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class Served:
    """One tiny model behind one real server, with an ``openai`` client (``client``) and an
    :class:`~mstar.MStarClient` (``sdk``) pointed at it."""

    def __init__(self, model: str, upload_dir: Path) -> None:
        import openai

        import mstar
        from mstar.server import create_app

        self.model = model
        self.engine = mstar.Engine(model, weights="tiny", device="cpu")
        self.upload_dir = upload_dir
        self.server = ServerThread(create_app(self.engine, upload_dir=upload_dir)).__enter__()
        self.url = self.server.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)
        self.sdk = mstar.MStarClient(self.url, timeout=120)

    def close(self) -> None:
        self.server.__exit__(None, None, None)
        self.engine.close()


@contextlib.contextmanager
def serving(upload_dir: Path) -> Iterator[Callable[[str], Served]]:
    """``get(model)`` starts a server for ``model`` on first use; all are stopped on exit."""
    cache: dict[str, Served] = {}

    def get(model: str) -> Served:
        if model not in cache:
            cache[model] = Served(model, upload_dir)
        return cache[model]

    try:
        yield get
    finally:
        for served in cache.values():
            served.close()


@contextlib.contextmanager
def serve(engine: Engine, upload_dir: Path, *, max_concurrent: int = 16, max_queue: int = 64,
          **settings: Any) -> Iterator[InProcessServer]:
    """``create_app(engine)`` on a uvicorn thread bound to 127.0.0.1."""
    upload_dir.mkdir(parents=True, exist_ok=True)
    srv = InProcessServer(engine, upload_dir=upload_dir, max_concurrent=max_concurrent, max_queue=max_queue, **settings).start()
    try:
        yield srv
    finally:
        srv.close()
