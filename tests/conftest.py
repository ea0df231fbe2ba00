"""Test setup: offline hub, the test tiers, and the fixtures shared by several test modules.

Tiers: ``python -m pytest -q`` runs everything; ``python -m pytest -m "not slow" -q`` is the fast loop.
A test is ``slow`` when it takes more than about a second here, loads real weights, compares against a
reference implementation, or soaks a server; tests that use ``reference_checkout`` are marked slow here.

Fixtures:

* ``fake_models`` (session) -- registers the fake model families of tests/helpers/fakes.py;
* ``shared_engine`` (session) -- ``shared_engine(name)``: one tiny engine per family for the whole run;
* ``served`` (module) -- ``served(model)``: a real uvicorn server for a tiny ``model``, started once per
  module, with an ``openai`` client and an ``MStarClient``; uploads must be gone at the end;
* ``reference_checkout`` (session) -- ``reference_checkout(name, probe)``: ``$MSTAR_REFS/<name>`` or a skip.

Plain helpers (servers, media, the soak driver) are in tests/helpers/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from mstar.engine import Engine
    from tests.helpers.servers import Served


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Reference-parity tests are slow by construction (they import and run an upstream implementation).
    for item in items:
        if "reference_checkout" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def fake_models() -> tuple[str, ...]:
    """Register the fake model families (``fake``, ``fakeimg``, ``fake_noapi``, ``fake_media``) and their adapters."""
    from tests.helpers.fakes import register_fakes

    return register_fakes()


@pytest.fixture(scope="session")
def shared_engine(fake_models: tuple[str, ...]) -> Iterator[Callable[[str], Engine]]:
    """``shared_engine(name)``: one tiny engine per family for the whole session (loading costs seconds)."""
    from mstar.engine import Engine

    engines: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name not in engines:
            engines[name] = Engine(name, weights="tiny")
        return engines[name]

    yield get
    for engine in engines.values():
        engine.close()


@pytest.fixture(scope="module")
def served(fake_models: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Served]]:
    """``served(model)``: a server for ``model``, started once per module."""
    from tests.helpers.servers import serving

    upload_dir = tmp_path_factory.mktemp("uploads")
    with serving(upload_dir) as get:
        yield get
    assert list(upload_dir.iterdir()) == [], "uploads must be deleted when their request ends"


@pytest.fixture(scope="session")
def reference_checkout() -> Callable[..., Path]:
    """``reference_checkout(name, probe, origin=None)``: ``$MSTAR_REFS/<name>``, or skip saying what to set."""
    from tests.helpers.refs import reference_checkout as find

    return find


