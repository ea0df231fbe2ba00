"""The mstar HTTP server (``pip install mstar[server]``): native ``/generate`` plus OpenAI-compatible ``/v1``.

Run it with ``mstar-server --model NAME``, or embed it::

    from mstar.server import create_app
    app = create_app(mstar.Engine("orpheus", weights="tiny"))   # any ASGI server runs ``app``
"""

from __future__ import annotations

import os
import sys

# OpenMP threads that spin while waiting (libgomp's default when no more threads than cores are in
# its pools, as for an Engine built on a loader thread) starve the event loop and the model thread
# each other on a busy machine: Qwen3-Omni speech took 13-45 s through the server instead of 2-3 s.
# Passive waiting is what a main-thread Engine gets anyway. libgomp reads this once, when torch
# loads, so it only applies if torch is not imported yet; an explicit setting wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mstar.server.app import create_app  # noqa: E402
from mstar.server.state import ServerConfig  # noqa: E402

__all__ = ["ServerConfig", "create_app"]
