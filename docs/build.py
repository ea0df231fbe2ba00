"""Build the docs site: ``python docs/build.py [OUTDIR]`` (default ``docs/_build/html``).

The one place for the Sphinx arguments, shared by ``nox -s docs`` and tests/test_docs_site.py:
warnings are errors, and ``--keep-going`` reports all of them before failing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
DEFAULT_OUT = DOCS / "_build" / "html"
SPHINX_ARGS = ("-W", "--keep-going", "-b", "html")


def command(out: Path = DEFAULT_OUT) -> list[str]:
    """The sphinx-build command line that writes the HTML site to ``out``."""
    return [sys.executable, "-m", "sphinx", *SPHINX_ARGS, str(DOCS), str(out)]


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print("usage: python docs/build.py [OUTDIR]", file=sys.stderr)
        return 2
    out = Path(argv[0]) if argv else DEFAULT_OUT
    return subprocess.run(command(out), check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
