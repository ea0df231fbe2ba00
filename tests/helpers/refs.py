"""Reference checkouts (the upstream repositories some parity tests compare against), found through ``MSTAR_REFS``.

``MSTAR_REFS`` names a directory holding one checkout per upstream project, under the project's own
repository name (``$MSTAR_REFS/Bagel``, ``$MSTAR_REFS/vjepa2``, ...). Without it, or without the
checkout a test needs, that test is skipped with a reason naming exactly what to provide.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

__all__ = ["REFS_ENV", "reference_checkout"]

REFS_ENV = "MSTAR_REFS"


def reference_checkout(name: str, probe: str, *, origin: str | None = None) -> Path:
    """``$MSTAR_REFS/<name>`` when it holds ``probe`` (a file of that checkout); otherwise skip the test.

    ``origin`` (e.g. ``"github.com/ByteDance-Seed/Bagel"``) is only used in the skip reason.
    """
    __tracebackhide__ = True  # report the skip at the test's line, not here
    what = f"a {name} checkout" + (f" (of {origin})" if origin else "")
    root = os.environ.get(REFS_ENV, "").strip()
    if not root:
        pytest.skip(f"set {REFS_ENV} to a directory holding {what} as {name}/ (this test reads {name}/{probe})")
    path = Path(root).expanduser() / name
    if not (path / probe).is_file():
        pytest.skip(f"{REFS_ENV}={root} does not hold {what}: {path / probe} is missing")
    return path
