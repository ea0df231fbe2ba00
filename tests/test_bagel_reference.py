"""BAGEL's passes equal the reference implementation's on the same tiny weights (float32).

Runs tests/fixtures/bagel_reference_check.py in a subprocess (it patches torch
globally) against the reference clone; skipped when the clone is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REF = Path(os.environ.get("BAGEL_REFERENCE", "/work/refs/Bagel"))
SCRIPT = Path(__file__).parent / "fixtures" / "bagel_reference_check.py"


@pytest.fixture(scope="module")
def check() -> dict[str, object]:
    if not (REF / "modeling" / "bagel" / "bagel.py").is_file():
        pytest.skip(f"reference BAGEL clone not found at {REF}")
    out = subprocess.run([sys.executable, str(SCRIPT), str(REF)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_context_layout_matches_reference(check: dict[str, object]) -> None:
    # Cache lengths and RoPE positions of the full, no-text and no-image contexts of an edit.
    assert check["kv_lens"] is True and check["ropes"] is True
    assert float(check["k_layer0"]) < 1e-5 and float(check["k_layer1"]) < 1e-5  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["v_cond", "v_global", "v_channel", "v_text_channel"])
def test_guided_velocity_matches_reference(check: dict[str, object], key: str) -> None:
    assert float(check[key]) < 1e-4  # type: ignore[arg-type]


def test_greedy_chat_tokens_match_reference(check: dict[str, object]) -> None:
    assert check["tokens_mine"] == check["tokens_ref"]
