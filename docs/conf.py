"""Sphinx configuration of the mstar docs site: the guides in ``docs/*.md`` (MyST Markdown), a
quickstart per model family, and an API reference generated from the docstrings by autodoc.

Build it with ``nox -s docs`` or ``python docs/build.py`` (warnings are errors in both).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
# autodoc imports mstar from this checkout, installed or not.
sys.path.insert(0, str(DOCS.parent))

import mstar  # noqa: E402

project = "mstar"
author = "the mstar authors"
copyright = "the mstar authors"
release = mstar.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
# The built site is not a source (nor are docs/*.py: only the suffixes above are read).
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

# Guides link to sections of each other (``reliability.md#long-run``): give every heading down to
# ``###`` the GitHub-style anchor, so the same links work on GitHub and on the site.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Pages index.md lists before they are written: left out of its toctree until the file exists.
OPTIONAL_PAGES = ("scaling",)

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
autodoc_class_signature = "separated"
# A subclass without a docstring shows none, rather than its parent's words as if they were its own.
autodoc_inherit_docstrings = False
# Types go into each entry's parameter list: the media unions would make signatures unreadable.
autodoc_typehints = "description"

html_theme = "furo"
html_title = f"mstar {release}"
html_static_path: list[str] = []


def _unlink_repo_folders(app: Any, doctree: Any) -> None:
    """Render a guide's link to a repository folder (``[bench/](../bench/)``) as its plain text.

    MyST turns links to repository files outside ``docs/`` into downloads, but a folder is neither
    a page nor a file, so the site has nothing to link to. A link to a path that does not exist
    is left alone and still fails the build.
    """
    from sphinx import addnodes

    here = (DOCS / app.env.docname).parent
    for node in list(doctree.findall(addnodes.pending_xref)):
        target = node.get("reftarget", "")
        if node.get("reftype") != "myst" or "://" in target or "#" in target:
            continue
        folder = Path(os.path.normpath(here / target))
        if folder.is_dir() and DOCS.parent in folder.parents and not folder.is_relative_to(DOCS):
            node.replace_self(node.children)


def _drop_unwritten_pages(app: Any, docname: str, source: list[str]) -> None:
    """Remove index.md's toctree lines naming an :data:`OPTIONAL_PAGES` entry that has no file yet."""
    if docname != root_doc:
        return
    missing = {page for page in OPTIONAL_PAGES if not (DOCS / f"{page}.md").exists()}
    source[0] = "".join(line for line in source[0].splitlines(keepends=True) if line.strip() not in missing)


def setup(app: Any) -> None:
    app.connect("source-read", _drop_unwritten_pages)
    app.connect("doctree-read", _unlink_repo_folders)
