"""The server and its HTTP clients as separate processes, for benchmarks against the in-process Engine.

:class:`ServerProcess` starts ``python -m mstar.server.cli`` (what ``mstar-server`` runs) on
loopback and a free port and waits for ``/ready``; a bench-only model (the fake family, or
Orpheus at a bench size) goes through ``_bench_server.py``, which sets that model up and then
calls the same CLI ``main``. :class:`ClientProcess` runs ``_http_clients.py`` and hands it jobs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from _common import ROOT
from _load import LoadResult

__all__ = ["ClientProcess", "ServerProcess", "free_port"]

BENCH = Path(__file__).resolve().parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


class ServerProcess:
    """``mstar-server`` in a child process on 127.0.0.1; a context manager that stops it (SIGTERM, then kill).

    ``cli_args`` are the CLI's flags (``--model`` and the rest; host and port are added);
    ``setup`` names a bench-only model set up by ``_bench_server.py`` first (None: the plain CLI)."""

    def __init__(self, cli_args: Sequence[str], *, setup: str | None = None, ready_timeout: float = 300.0) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        self.url = f"http://{self.host}:{self.port}"
        entry = [str(BENCH / "_bench_server.py"), setup] if setup else ["-m", "mstar.server.cli"]
        self.command = [sys.executable, *entry, *cli_args, "--host", self.host, "--port", str(self.port)]
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server is not running")
        return self.proc.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far (all its threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, chars: int = 3000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_bytes()[-chars:].decode(errors="replace")

    def __enter__(self) -> ServerProcess:
        self._log = tempfile.NamedTemporaryFile(prefix="mstar-bench-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=_env(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the server was not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ready", timeout=5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            os.unlink(self._log.name)
            self._log = None


class ClientProcess:
    """The HTTP clients in a child process (``_http_clients.py``); :meth:`run` is one timed load."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ClientProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(BENCH / "_http_clients.py")], cwd=ROOT, env=_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        return self

    def run(
        self, url: str, texts: list[str], kwargs: dict[str, Any], *, seed0: int = 1000,
        outputs: Sequence[str] = ("audio",), streaming: bool = True,
    ) -> LoadResult:
        """The same load as ``run_engine_load(engine, texts, kwargs, ...)``, sent to ``url``'s ``/generate``."""
        if self.proc is None or self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("the client process is not running")
        job = {"url": url, "texts": texts, "kwargs": kwargs, "seed0": seed0, "outputs": list(outputs), "streaming": streaming}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process ended (exit status {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"HTTP load failed: {reply['error']}")
        return LoadResult.from_dict(reply["result"])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the worker's loop ends at end of input
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
