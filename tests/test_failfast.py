"""Failing fast and clean: a server that cannot load exits, engines never abort the interpreter,
out-of-range inputs are refused (never clamped), and progress bars stay out of logs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mstar import progress
from mstar.engine import Engine
from mstar.errors import InvalidParameterError, ShapeError, WeightsError
from mstar.server import cli
from mstar.weights import CLI_WEIGHTS_HINT, WEIGHTS_HINT, resolve_checkpoint_dir
from tests.helpers.media import make_mp4, make_png

CAMS = [make_png(224, 224)]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


# ------------------------------------------------------------------------------------ the server CLI


@pytest.mark.slow
def test_server_exits_non_zero_when_the_model_cannot_load(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mstar.server.cli", "--model", "orpheus", "--weights", str(tmp_path / "missing"),
         "--port", "0", "--log-level", "warning"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert time.monotonic() - start < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not be loaded" in last and "does not exist" in last
    assert "--weights tiny" in last and "weights='tiny'" not in last


def test_failure_message_speaks_the_cli_spelling() -> None:
    msg = cli.load_failure_message("orpheus", WeightsError(f"no checkpoint here. {WEIGHTS_HINT}"))
    assert CLI_WEIGHTS_HINT in msg and WEIGHTS_HINT not in msg
    assert cli.load_failure_message("orpheus", WeightsError("bad shapes")).endswith(CLI_WEIGHTS_HINT)
    assert "RuntimeError: CUDA out of memory" in cli.load_failure_message("orpheus", RuntimeError("CUDA out of memory"))


def test_a_path_that_does_not_exist_is_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist") as info:
        resolve_checkpoint_dir(tmp_path / "nope")
    assert "hub" not in str(info.value).split(".")[0]


def test_help_names_each_default_once_and_never_the_api_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSTAR_API_KEY", "sekrit-key")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: cuda if available)" in text and "(default: 8000)" in text
    assert "sekrit-key" not in text
    parser = cli.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        help_text = formatter._get_help_string(action) % {"default": action.default}  # as --help prints it
        assert help_text.count("default") <= 1, help_text


# ------------------------------------------------------------------------------------ interpreter exit

_LEFT_OPEN = textwrap.dedent(
    """
    import threading, mstar
    box = {}
    def build():
        engine = box["engine"] = mstar.Engine("orpheus", weights="tiny")
        box["stream"] = engine.stream(text="Hello there, how are you today? " * 3, max_output_tokens=5000)
        next(iter(box["stream"]))  # the scheduler is mid-generation when the interpreter exits
    t = threading.Thread(target=build)
    t.start()
    t.join()
    print("exiting")
    """
)


@pytest.mark.slow
def test_an_engine_left_open_in_a_thread_does_not_abort_the_interpreter() -> None:
    for _ in range(3):  # the abort it guards against happened 3 runs in 4
        proc = subprocess.run([sys.executable, "-c", _LEFT_OPEN], capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 0 and proc.stdout.strip() == "exiting", proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr


def test_close_is_idempotent_and_forgets_the_engine(fake_models: tuple[str, ...]) -> None:
    from mstar import engine as engine_module

    e = Engine("fake", weights="tiny", device="cpu")
    assert e in engine_module._LIVE
    e.close()
    e.close()
    assert e not in engine_module._LIVE


# ------------------------------------------------------------------------------------ no silent clamps


@pytest.mark.parametrize("state", [[5.0], [0.1, -1.5], [0.0, 0.0, 1.0001]])
def test_pi05_refuses_a_state_outside_the_normalised_range(
    shared_engine: Callable[[str], Engine], state: list[float]
) -> None:
    with pytest.raises(InvalidParameterError, match=r"normalised to \[-1, 1\]") as info:
        shared_engine("pi05").generate(text="pick", images=CAMS[:1], robot_state=state, num_steps=1)
    assert info.value.param == "robot_state"


def test_pi05_accepts_the_edges_of_the_range(shared_engine: Callable[[str], Engine]) -> None:
    res = shared_engine("pi05").generate(text="pick", images=CAMS[:1], robot_state=[-1.0, 1.0], num_steps=1)
    assert res.tensors and res.tensors[0].modality == "action"


def test_vjepa2_refuses_more_frames_than_the_clip_has(shared_engine: Callable[[str], Engine]) -> None:
    with pytest.raises(ShapeError, match="num_frames=100 but the clip has 8 frames.*at most 8") as info:
        shared_engine("vjepa2").generate(video=make_mp4(8, 32, 32), num_frames=100)
    assert info.value.param == "num_frames"


def test_vjepa2_refuses_a_frame_count_that_is_not_whole_tubelets(shared_engine: Callable[[str], Engine]) -> None:
    with pytest.raises(InvalidParameterError, match="multiple of 2"):
        shared_engine("vjepa2").generate(video=make_mp4(8, 32, 32), num_frames=5)


# ------------------------------------------------------------------------------------ natural defaults


def test_pi05_returns_actions_without_naming_the_modality(shared_engine: Callable[[str], Engine]) -> None:
    res = shared_engine("pi05").generate(text="pick up the cube", images=CAMS[:1], robot_state=[0.1, -0.2], num_steps=1)
    assert [t.modality for t in res.tensors] == ["action"]


def test_vjepa2_returns_latents_without_naming_the_modality(shared_engine: Callable[[str], Engine]) -> None:
    res = shared_engine("vjepa2").generate(video=make_mp4(4, 32, 32))
    assert [t.modality for t in res.tensors] == ["latent"]


def test_orpheus_returns_audio_without_naming_the_modality(shared_engine: Callable[[str], Engine]) -> None:
    res = shared_engine("orpheus").generate(text="Hi", max_output_tokens=28)
    assert res.audio is not None and len(res.audio) > 0 and not res.text


# ------------------------------------------------------------------------------------ progress bars


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _save_tensors(directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir()
    save_file({"w": torch.zeros(2)}, str(directory / "model.safetensors"))
    return directory


def _load_vjepa2(directory: Path) -> None:
    from mstar.models.vjepa2.checkpoint import _safetensors_state

    assert set(_safetensors_state(directory, lambda name: True)) == {"w"}


def test_progress_is_quiet_when_stderr_is_not_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    assert not progress.progress_enabled()
    _load_vjepa2(_save_tensors(tmp_path / "ckpt"))
    assert capsys.readouterr().err == ""


def test_progress_shows_on_a_terminal_unless_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    _load_vjepa2(_save_tensors(tmp_path / "ckpt"))
    assert "loading ckpt" in terminal.getvalue()
    monkeypatch.setenv(progress.PROGRESS_ENV, "0")
    assert not progress.progress_enabled()
    assert progress.hub_tqdm_class()(range(3)).disable


def test_progress_can_be_forced_on_for_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    assert list(progress.progress(range(4), desc="converting", unit="tensor")) == [0, 1, 2, 3]
    assert "converting" in log.getvalue()
