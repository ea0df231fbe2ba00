"""bench/gpu.py (the device check) must not rot: its --smoke mode runs every section's code path on CPU.

The script runs as a subprocess from the repository root, as it would on the GPU machine; these
tests read the JSON it writes. They also check the harness: a failing section is recorded with its
traceback and the run goes on, a section over budget is skipped with the reason, and the watchdog
ends a hung run with the partial results saved.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

SECTIONS = [
    "bandwidth", "orpheus_build", "orpheus_eager", "snac", "hf_static", "orpheus_free", "qwen3_thinker", "bagel",
    "orpheus_rebuild", "orpheus_graphs", "hf_static_compiled",
]
#: Sections whose record holds measured levels, and the batch sizes the smoke run measures.
LEVELS = {
    "orpheus_eager": [1, 2], "hf_static": [1, 2], "qwen3_thinker": [1, 2], "bagel": [1, 2], "orpheus_graphs": [1, 2],
    "hf_static_compiled": [1],
}

pytestmark = pytest.mark.slow


def run_gpu_script(results: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--results-dir", str(results), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )
    path = results / "gpu_smoke.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    return proc, doc


def positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_smoke_runs_every_section(tmp_path: Path) -> None:
    proc, doc = run_gpu_script(tmp_path, "--smoke", "--markdown")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert doc["smoke"] is True and doc["complete"] is True
    secs = doc["sections"]
    assert list(secs) == SECTIONS
    for name in SECTIONS:
        assert secs[name]["status"] == "ok", (name, secs[name].get("error"), secs[name].get("traceback_tail"))
        assert positive(secs[name]["elapsed_s"]) or secs[name]["elapsed_s"] == 0

    assert positive(secs["bandwidth"]["bytes_per_s"])
    assert positive(secs["orpheus_build"]["weight_bytes"]) and secs["orpheus_build"]["twin_shares_tensors"] is True
    for name, batches in LEVELS.items():
        levels = secs[name]["levels"]
        assert [lv["batch"] for lv in levels] == batches, name
        for lv in levels:
            assert positive(lv["decode_tok_s"]), (name, lv)
            assert positive(lv["bound_tok_s"]) and positive(lv["fraction_of_bound"]), (name, lv)

    for name in ("orpheus_eager", "orpheus_graphs"):
        rec = secs[name]
        assert rec["engine"]["cuda_graphs"] is (name == "orpheus_graphs")
        for lv in rec["levels"]:
            assert lv["steps_timed"] >= 3 and positive(lv["step_median_s"])
            assert positive(lv["ttfa_s_p50"]), (name, lv)
            assert lv["finish_reasons"] == ["length"]  # forced audio: every request decodes its full length
            # KV accounting from engine.stats(): blocks follow the live tokens, nothing preempted
            assert lv["kv_blocks_used"] > 0 and lv["kv_live_tokens"] > 0
            assert 1.0 <= lv["kv_in_use_over_live"] < 2.0 and lv["kv_proportional"] is True
            assert lv["preemptions"] == 0
    # mixed prompt lengths within a batch
    lengths = secs["orpheus_eager"]["prompt_lengths"]["2"]
    assert len(set(lengths)) == 2
    assert positive(secs["orpheus_eager"]["ttfa_batch1"]["ttfa_s_p50"])

    for lv in secs["snac"]["levels"]:
        assert positive(lv["windows_per_s"]) and positive(lv["audio_s_per_s"])
    assert all(positive(lv["distinct_experts_per_layer"]) for lv in secs["qwen3_thinker"]["levels"])
    assert positive(secs["qwen3_thinker"]["params"]) and positive(secs["bagel"]["params"])

    targets = {t["target"]: t for t in doc["targets"]}
    assert len(targets) >= 7
    assert all(t["met"] is not None for t in targets.values()), targets
    assert "| section | B | rate |" in proc.stdout and "| target | measured | met? |" in proc.stdout


def test_failures_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    proc, doc = run_gpu_script(tmp_path, "--smoke", "--only", "bandwidth,bagel", "--inject", "bandwidth=error")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    secs = doc["sections"]
    assert secs["bandwidth"]["status"] == "error"
    assert "injected failure" in secs["bandwidth"]["error"] and "Traceback" in secs["bandwidth"]["traceback_tail"]
    assert secs["bagel"]["status"] == "ok"
    assert all(lv["bound_tok_s"] is None and positive(lv["decode_tok_s"]) for lv in secs["bagel"]["levels"])
    assert secs["orpheus_eager"]["status"] == "skipped" and "not selected" in secs["orpheus_eager"]["reason"]


def test_over_budget_sections_are_skipped_with_the_reason(tmp_path: Path) -> None:
    proc, doc = run_gpu_script(tmp_path, "--smoke", "--budget-s", "0")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert doc["complete"] is True
    for name in SECTIONS:
        rec = doc["sections"][name]
        assert rec["status"] == "skipped" and rec["reason"].startswith(("budget:", "needs section")), (name, rec)
    assert doc["sections"]["bandwidth"]["reason"].startswith("budget:")


def test_watchdog_ends_a_hung_run_and_keeps_the_results(tmp_path: Path) -> None:
    proc, doc = run_gpu_script(tmp_path, "--smoke", "--only", "bandwidth,bagel", "--inject", "bagel=hang", "--budget-s", "3", "--grace-s", "1")
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-4000:]
    assert doc["watchdog"]["in_section"] == "bagel"
    assert doc["sections"]["bandwidth"]["status"] == "ok"
    assert doc["sections"]["bagel"]["status"] == "error" and "watchdog" in doc["sections"]["bagel"]["error"]


def test_without_cuda_it_exits_2_and_says_why(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc, _ = run_gpu_script(tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
