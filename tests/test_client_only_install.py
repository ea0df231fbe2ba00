"""The client-only install recipe works: a fresh venv, ``pip install --no-deps`` mstar, then requests
and numpy, and MStarClient talks to a running server while torch, transformers and PyAV are absent.

The recipe is the one README.md and docs/client.md give. The venv is made without system site
packages, the package is installed from a copy of this checkout (its build writes ``build/`` and
``*.egg-info`` into the tree it builds), and the server is a tiny Orpheus in this test process,
guarded by an API key that the venv's client reads from ``$MSTAR_API_KEY``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mstar.server import create_app
from tests.helpers.servers import ServerThread

pytestmark = pytest.mark.slow  # a venv and two pip installs: about 20 s

ROOT = Path(__file__).resolve().parent.parent
KEY = "client-only-key"
ENGINE_ONLY = ("torch", "transformers", "av", "PIL", "safetensors", "litestar")

# Runs inside the venv: prints one JSON line with what it saw.
VENV_SCRIPT = """
import importlib.util, json, sys
import mstar
from mstar import MStarClient, errors

url = sys.argv[1]
out = {"mstar": mstar.__file__, "present": [m for m in sys.argv[2:] if importlib.util.find_spec(m) is not None]}
client = MStarClient(url)  # the key comes from $MSTAR_API_KEY
out["ready"] = client.ready()
audio = client.tts("Hello there", voice="tara", seed=2, max_output_tokens=35)
out["pcm"] = audio.pcm.hex()
out["sample_rate"] = audio.sample_rate
try:
    client.tts("Hello", voice="bob")
except errors.UnknownVoiceError as exc:
    out["bad_voice"] = [type(exc).__name__, str(exc)]
try:
    MStarClient(url, api_key="wrong").ready()
except errors.AuthenticationError as exc:
    out["wrong_key"] = type(exc).__name__
out["loaded"] = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))
print(json.dumps(out))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_the_client_installs_and_runs_without_torch(shared_engine: Callable[[str], Any], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(ROOT / "mstar", src / "mstar", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["MSTAR_API_KEY"] = KEY
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env, 120)
    python = str(venv / "bin" / "python")
    # The recipe: the package without its dependencies, then the client's own two.
    _run([python, "-m", "pip", "install", "-q", "--no-deps", str(src)], tmp_path, env, 300)
    _run([python, "-m", "pip", "install", "-q", "requests>=2.31", "numpy>=1.26"], tmp_path, env, 300)

    engine = shared_engine("orpheus")
    with ServerThread(create_app(engine, upload_dir=tmp_path / "uploads", api_key=KEY)) as server:
        script = tmp_path / "client_only.py"
        script.write_text(VENV_SCRIPT)
        out = json.loads(_run([python, str(script), server.url, *ENGINE_ONLY], tmp_path, env, 300).splitlines()[-1])

    assert out["mstar"].startswith(str(venv)), "the venv must use its own install, not the checkout"
    assert out["present"] == [] and out["loaded"] == [], "engine-only packages are not part of a client install"
    assert out["ready"] is True
    local = engine.tts("Hello there", voice="tara", seed=2, max_output_tokens=35)
    assert bytes.fromhex(out["pcm"]) == local.pcm and out["sample_rate"] == local.sample_rate
    assert out["bad_voice"][0] == "UnknownVoiceError" and "valid voices: tara" in out["bad_voice"][1]
    assert out["wrong_key"] == "AuthenticationError"
