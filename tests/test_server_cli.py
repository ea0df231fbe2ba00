"""The ``mstar-server`` command: flags, safe defaults, background loading."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from mstar.server import cli
from tests.helpers.servers import ServerThread

FLAGS = ["--model", "--weights", "--host", "--port", "--device", "--dtype", "--upload-dir", "--max-upload-mb",
         "--max-concurrent", "--max-queue", "--allow-remote-media", "--api-key"]


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text, flag


def test_binds_loopback_by_default() -> None:
    args = cli.build_parser().parse_args(["--model", "orpheus"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.allow_remote_media is False


def test_unknown_model_exits_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.usefixtures("fake_models")
def test_server_answers_while_the_model_loads_then_becomes_ready(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import uvicorn

    captured: dict[str, Any] = {}
    with monkeypatch.context() as patch:  # only the CLI's server is a stand-in; ServerThread's below is real
        patch.setattr(
            uvicorn.Server, "run", lambda self, **kw: captured.update(app=self.config.app, host=self.config.host)
        )
        assert cli.main(["--model", "fake", "--weights", "tiny", "--upload-dir", str(tmp_path), "--api-key", "k"]) == 0
    assert captured["host"] == "127.0.0.1"
    with ServerThread(captured["app"]) as srv:
        assert requests.get(srv.url + "/health").status_code == 200
        auth = {"Authorization": "Bearer k"}
        deadline = time.monotonic() + 30
        while requests.get(srv.url + "/ready", headers=auth).status_code != 200:
            assert time.monotonic() < deadline, "the model never became ready"
            time.sleep(0.05)
        r = requests.post(srv.url + "/generate", files={"text": (None, "hi"), "streaming": (None, "false")}, headers=auth)
        assert r.status_code == 200
