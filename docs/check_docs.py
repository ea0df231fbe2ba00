"""Docs check (``nox -s docs``): every public module imports and has a docstring; doc links resolve."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import mstar

    problems = []
    for mod in pkgutil.walk_packages(mstar.__path__, "mstar."):
        try:
            module = importlib.import_module(mod.name)
        except ImportError as exc:
            problems.append(f"{mod.name}: import failed: {exc}")
            continue
        if not (module.__doc__ or "").strip():
            problems.append(f"{mod.name}: no module docstring")
    # Every page of the site, the quickstart and API pages included; not the built site.
    pages = [p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.relative_to(ROOT / "docs").parts]
    for doc in sorted(pages):
        for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            if not (doc.parent / target).exists():
                problems.append(f"{doc.relative_to(ROOT / 'docs')}: broken link {target}")
    for p in problems:
        print(p)
    print(f"docs check: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
