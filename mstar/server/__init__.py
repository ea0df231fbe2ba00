"""The mstar HTTP server (``pip install mstar[server]``): native ``/generate`` plus OpenAI-compatible ``/v1``.

Run it with ``mstar-server --model NAME``, or embed it::

    from mstar.server import create_app
    app = create_app(mstar.Engine("orpheus", weights="tiny"))   # any ASGI server runs ``app``
"""

from __future__ import annotations

from mstar.server.app import create_app
from mstar.server.state import ServerConfig

__all__ = ["ServerConfig", "create_app"]
