"""The docs site: it builds warning-free with an API page for each public surface, its quickstart
examples run as written on the tiny weights, and the docstring and link check passes."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# docs/build.py, the one place for the sphinx-build arguments (loaded by path: docs/ is no package).
_spec = importlib.util.spec_from_file_location("mstar_docs_build", DOCS / "build.py")
assert _spec is not None and _spec.loader is not None
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

QUICKSTARTS = sorted(p for p in (DOCS / "quickstart").glob("*.md") if p.name != "index.md")
# What each quickstart's example says it writes, relative to where it runs.
WRITES = {
    "orpheus": ["hello.wav"],
    "qwen3_omni": ["reply.wav"],
    "bagel": ["cube.png", "lighthouse.png"],
    "pi05": [],
    "vjepa2": ["clip.mp4"],
}


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the page's ```` ```python ```` fences, in order. Examples that need a running
    server are written as ```` ```{code-block} python ```` and are not returned."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in markdown.splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, "an unclosed ```python fence"
    return blocks


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(build.command(out), capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert proc.returncode == 0, f"the docs build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.mark.slow
def test_the_site_builds_with_warnings_as_errors(site: Path) -> None:
    assert "-W" in build.SPHINX_ARGS and "--keep-going" in build.SPHINX_ARGS
    assert (site / "index.html").is_file() and (site / "search.html").is_file()
    for page in QUICKSTARTS:
        assert (site / "quickstart" / f"{page.stem}.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("page", "objects"),
    [
        ("engine", ["mstar.Engine", "mstar.Engine.generate", "mstar.Engine.tts", "mstar.engine.EventStream"]),
        ("client", ["mstar.MStarClient", "mstar.MStarClient.generate"]),
        ("types", ["mstar.types.GenerateResult", "mstar.types.AudioBuffer", "mstar.types.TextChunk", "mstar.types.Finished"]),
        ("errors", ["mstar.errors.MStarError", "mstar.errors.InvalidRequestError", "mstar.errors.RateLimitError"]),
        ("settings", ["mstar.settings.RunnerSettings"]),
        ("registry", ["mstar.registry.list_models", "mstar.registry.ModelInfo"]),
    ],
)
def test_the_api_page_documents_its_objects_from_their_docstrings(site: Path, page: str, objects: list[str]) -> None:
    html = (site / "api" / f"{page}.html").read_text()
    for name in objects:
        assert f'id="{name}"' in html, f"api/{page}.html has no entry for {name}"


@pytest.mark.slow
def test_the_generated_entries_carry_the_docstrings(site: Path) -> None:
    import mstar
    from mstar.errors import RequestError

    for obj, page in [(mstar.Engine, "engine"), (mstar.MStarClient, "client"), (RequestError, "errors")]:
        first_line = (obj.__doc__ or "").strip().splitlines()[0]
        assert first_line in (site / "api" / f"{page}.html").read_text(), f"api/{page}.html lacks {obj.__name__}'s docstring"


@pytest.mark.slow
@pytest.mark.parametrize("page", QUICKSTARTS, ids=[p.stem for p in QUICKSTARTS])
def test_the_quickstart_example_runs_as_written(page: Path, tmp_path: Path) -> None:
    blocks = python_blocks(page.read_text())
    assert blocks, f"{page.name} has no runnable example"
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(blocks) + "\n")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300, check=False
    )
    assert proc.returncode == 0, f"{page.name}'s example failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for name in WRITES.get(page.stem, []):
        assert (tmp_path / name).stat().st_size > 0, f"{page.name}'s example wrote no {name}"


def test_python_blocks_skip_server_examples_and_keep_order() -> None:
    page = "```python\na = 1\n```\n\n```{code-block} python\nserver()\n```\n\n```bash\nls\n```\n```python\nb = a\n```\n"
    assert python_blocks(page) == ["a = 1", "b = a"]


@pytest.mark.slow
def test_every_module_has_a_docstring_and_every_guide_link_resolves() -> None:
    proc = subprocess.run(
        [sys.executable, str(DOCS / "check_docs.py")], capture_output=True, text=True, env=_env(), timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert re.search(r"docs check: 0 problem\(s\)", proc.stdout)
