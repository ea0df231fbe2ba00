"""BAGEL's passes equal the reference implementation's (ByteDance-Seed/Bagel) on the same tiny weights (float32).

Our side runs here, in-process, on the case of ``tests/fixtures/bagel_parity.py``
(an edit's three contexts, guided velocities, greedy tokens), and is compared
with the reference's outputs on the same weights and inputs:

* ``[recorded]``: those saved in ``tests/fixtures/bagel_reference.safetensors``
  by ``tests/fixtures/bagel_reference_record.py``; its header names the
  reference commit and the command. These run everywhere, with no checkout.
* ``[live]``: a fresh run of the reference, when ``MSTAR_REFS`` names a
  directory holding a ``Bagel/`` checkout (the record script in a subprocess,
  since it patches torch; ``MSTAR_REFS_PYTHON`` may name the interpreter, as
  the reference wants transformers 4.49). The live run is also checked
  against the recording, so a stale fixture shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.fixtures.bagel_parity import (
    FIXTURE,
    TOLERANCES,
    failures,
    mstar_outputs,
    parity_config,
    parity_state,
    weights_digest,
)

RECORD = Path(__file__).parent / "fixtures" / "bagel_reference_record.py"
LAYOUT = ("kv_lens", "ropes", "k_layer0", "k_layer1")
VELOCITIES = ("v_cond", "v_global", "v_channel", "v_text_channel")
ALL = (*LAYOUT, *VELOCITIES, "tokens")
Outputs = dict[str, torch.Tensor]
Pair = tuple[Outputs, Outputs]  # ours, the reference's


@dataclass
class Recording:
    ref: Outputs  # the reference's outputs
    inputs: Outputs
    meta: dict[str, str]


def _load(path: Path) -> Recording:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
        meta = dict(f.metadata() or {})
    pick = lambda prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return Recording(ref=pick("ref."), inputs=pick("input."), meta=meta)


@pytest.fixture(scope="module")
def state() -> Outputs:
    return parity_state(parity_config())


@pytest.fixture(scope="module")
def recorded() -> Recording:
    return _load(FIXTURE)


@pytest.fixture(scope="module")
def live(reference_checkout: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Recording:
    # Skips with "set MSTAR_REFS to a directory holding a Bagel checkout ..." when there is none.
    checkout = reference_checkout("Bagel", "modeling/bagel/bagel.py", origin="github.com/ByteDance-Seed/Bagel")
    out = tmp_path_factory.mktemp("bagel_live") / "live.safetensors"
    python = os.environ.get("MSTAR_REFS_PYTHON", sys.executable)
    done = subprocess.run(
        [python, str(RECORD), str(checkout), "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _load(out)


@pytest.fixture(scope="module", params=["recorded", pytest.param("live", marks=pytest.mark.slow)])
def pair(request: pytest.FixtureRequest, state: Outputs) -> Pair:
    """(ours, the reference's), on the inputs of the recorded or the live run."""
    run: Recording = request.getfixturevalue(request.param)
    assert weights_digest(state) == run.meta["weights_sha256"], (
        "the parity weights differ from those the reference ran on (a parameter renamed or reshaped?); "
        f"re-record with: {run.meta.get('command')}"
    )
    return mstar_outputs(state, run.inputs), run.ref


def test_recording_names_its_reference_and_stays_small(recorded: Recording) -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", recorded.meta["reference_commit"])
    assert recorded.meta["command"].startswith("python tests/fixtures/bagel_reference_record.py ")
    assert FIXTURE.stat().st_size < 256 * 1024
    assert set(recorded.ref) == set(ALL) and set(recorded.inputs) == {"clean", "vit_image", "x_t"}


def test_context_layout_matches_reference(pair: Pair) -> None:
    # Cache lengths and RoPE positions of the full, no-text and no-image contexts of an edit, and the keys of
    # both layers of the full one.
    ours, ref = pair
    assert failures(ours, ref, LAYOUT) == []
    assert TOLERANCES["k_layer0"] == TOLERANCES["k_layer1"] == 1e-5


@pytest.mark.parametrize("key", VELOCITIES)
def test_guided_velocity_matches_reference(pair: Pair, key: str) -> None:
    ours, ref = pair
    assert failures(ours, ref, (key,)) == []
    assert TOLERANCES[key] == 1e-4


def test_greedy_chat_tokens_match_reference(pair: Pair) -> None:
    ours, ref = pair
    assert ours["tokens"].tolist() == ref["tokens"].tolist()


def test_live_reference_matches_the_recording(live: Recording, recorded: Recording) -> None:
    """The recording is still what the reference gives (else re-record it with the command in its header)."""
    assert live.meta["weights_sha256"] == recorded.meta["weights_sha256"]
    for name in live.inputs:
        assert torch.equal(live.inputs[name], recorded.inputs[name]), name
    assert failures(live.ref, recorded.ref, ALL) == [], f"re-record with: {recorded.meta['command']}"
