"""Progress bars for weight download, conversion and load: shown to people, quiet for programs.

Bars are on when stderr is a terminal or a Jupyter kernel's stream, and off otherwise
(CI logs, servers under a supervisor, pipes), so logs stay free of carriage returns.
``MSTAR_PROGRESS=1`` forces them on and ``MSTAR_PROGRESS=0`` off. Hub downloads use
the hub's own bars, made to follow the same rule (:func:`hub_tqdm_class`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any, TypeVar

__all__ = ["PROGRESS_ENV", "hub_tqdm_class", "progress", "progress_enabled"]

PROGRESS_ENV = "MSTAR_PROGRESS"
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

log = logging.getLogger("mstar.progress")
T = TypeVar("T")


def progress_enabled() -> bool:
    """Whether bars are drawn now: ``$MSTAR_PROGRESS`` if set, else whether stderr is interactive."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in _ON:
        return True
    if forced in _OFF:
        return False
    if forced:
        log.warning("%s=%r is not one of %s; deciding by the terminal", PROGRESS_ENV, forced, "/".join(_ON + _OFF))
    stream = sys.stderr
    if stream is None:
        return False
    # A notebook's stderr is the kernel's stream, not a TTY, but a person is watching it.
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items``, with a bar while they are consumed (see :func:`progress_enabled`)."""
    if not progress_enabled():
        yield from items
        return
    from tqdm.auto import tqdm

    with tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield from bar


@cache
def hub_tqdm_class() -> type[Any]:
    """A ``tqdm_class`` for ``huggingface_hub`` downloads that follows :func:`progress_enabled`."""
    from tqdm.auto import tqdm

    class HubBar(tqdm):  # type: ignore[misc, type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not progress_enabled():
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return HubBar
