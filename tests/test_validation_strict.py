"""One validation layer: every bad field on every route and served model gets a 4xx naming it.

The corpus is data (tests/data/bad_inputs_validation.json). Each case names the
route, the body (``json``, ``form`` with optional ``files``, or ``raw`` text with
its content type), the ``models`` it applies to (a list, or ``"all"``: every
served family, real tiny models included) and the expected ``status`` with
optional ``param``, ``code`` and ``message`` fragment. In bodies, ``$model`` is
the served model's name, ``$repeat:N:c`` is ``c`` N times, ``$deep:N`` is N
nested JSON arrays, and ``$parts:N`` (raw) is a multipart body of N parts.

The targeted tests below cover what a table cannot: the request-id rule in the
Engine, the bounded early-cancel stash, and the remote-fetch deadline against
a server that trickles.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

import mstar
from mstar.errors import InvalidParameterError, InvalidRequestError, MediaError
from mstar.models.params import Param
from mstar.protocol import REQUEST_ID_MAX_LEN, SEED_MAX, check_request_id, check_seed, check_timeout
from mstar.scheduler import EarlyCancels
from mstar.server import create_app, media_io
from tests.helpers.corpus import check_error_answer
from tests.helpers.media import media_recipe
from tests.helpers.servers import ServerThread

CASES: list[dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "bad_inputs_validation.json").read_text())
#: Every family the corpus runs against when a case says ``"models": "all"``.
ALL_MODELS = ("fake", "fakeimg", "orpheus", "qwen3_omni", "bagel", "pi05", "vjepa2", "vjepa2_ac")
_REPEAT = re.compile(r"\$repeat:(\d+):(.)", re.S)
_DEEP_JSON = re.compile(r'"\$deep:(\d+)"')
_DEEP = re.compile(r"\$deep:(\d+)")
_PARTS = re.compile(r"\$parts:(\d+)")


def _pairs() -> list[tuple[dict[str, Any], str]]:
    out = []
    for case in CASES:
        models = ALL_MODELS if case["models"] == "all" else case["models"]
        out.extend((case, m) for m in models)
    return out


PAIRS = _pairs()


# --------------------------------------------------------------------------- servers and sending


@pytest.fixture(scope="module")
def server_for(shared_engine: Callable[[str], mstar.Engine],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], ServerThread]]:
    """``server_for(model)``: one server per family, started on first use (bodies capped at 7 MiB)."""
    root = tmp_path_factory.mktemp("validation")
    started: dict[str, ServerThread] = {}

    def get(model: str) -> ServerThread:
        if model not in started:
            app = create_app(shared_engine(model), upload_dir=root / model, max_upload_mb=1.0)
            started[model] = ServerThread(app).__enter__()
        return started[model]

    yield get
    for srv in started.values():
        srv.__exit__(None, None, None)
    leftovers = [p for p in root.rglob("*") if p.is_file()]
    assert leftovers == [], "uploads must be deleted when their request ends"


def _text(value: str, model: str) -> str:
    value = value.replace("$model", model)
    value = _REPEAT.sub(lambda m: m.group(2) * int(m.group(1)), value)
    return _DEEP.sub(lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), value)


def _parts(n: int) -> str:
    return "".join(f'--XX\r\nContent-Disposition: form-data; name="p{i}"\r\n\r\nv\r\n' for i in range(n)) + "--XX--\r\n"


def _send(srv: ServerThread, case: dict[str, Any], model: str) -> requests.Response:
    kwargs: dict[str, Any] = {"timeout": 60}
    if "json" in case:
        text = _DEEP_JSON.sub(lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), json.dumps(case["json"], ensure_ascii=False))
        kwargs["data"] = _text(text, model).encode()
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif "raw" in case:
        raw = _PARTS.sub(lambda m: _parts(int(m.group(1))), case["raw"]["latin1"])
        kwargs["data"] = _text(raw, model).encode("latin-1")  # "latin1": each character is one byte, as written
        kwargs["headers"] = {"Content-Type": case["raw"]["content_type"]}
    elif "form" in case or "files" in case:
        parts: list[tuple[str, Any]] = [(k, (None, _text(v, model).encode())) for k, v in case.get("form", {}).items()]
        parts += [(f["field"], (f["filename"], media_recipe(f["recipe"]), "application/octet-stream")) for f in case.get("files", [])]
        kwargs["files"] = parts
    return requests.request(case["method"], srv.url + case["path"], **kwargs)


# --------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize(("case", "model"), PAIRS, ids=[f"{c['name']}-{m}" for c, m in PAIRS])
def test_bad_field_gets_a_4xx_naming_it(server_for: Callable[[str], ServerThread], case: dict[str, Any], model: str) -> None:
    resp = _send(server_for(model), case, model)
    err = check_error_answer(resp, case, f"{case['name']} on {model}")
    assert len(err["message"]) <= 600, "errors stay short, whatever the client sent"
    assert "Traceback" not in err["message"] and "/tmp" not in err["message"], err


def test_corpus_is_large_unique_and_every_case_says_why() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) >= 270 and len(names) == len(set(names))
    assert all(c.get("why") for c in CASES)
    assert all(400 <= c["status"] < 500 for c in CASES)
    for prefix in ("gen_request_id_", "cancel_path_", "gen_multipart_", "chat_max_tokens_", "speech_response_format_",
                   "images_size_", "images_seed_overflow", "edits_", "chat_raw_", "gen_model_kwargs_",
                   "gen_model_kwargs_seed_text_", "gen_query_", "gen_messages_role_", "gen_messages_part_", "gen_urlencoded_",
                   "gen_json_duplicate_key", "chat_user_", "gen_upload_bomb_names_the_file", "describe_query_"):
        assert any(n.startswith(prefix) for n in names), prefix


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize("rid", ["a", "req-1", "A.b_c~d-9", "x" * REQUEST_ID_MAX_LEN, "...x"])
def test_request_id_rule_accepts_header_and_path_safe_ids(rid: str) -> None:
    assert check_request_id(rid) == rid


@pytest.mark.parametrize("rid", ["", "a b", "a/b", "a\r\nb", "é", ".", "..", "x" * (REQUEST_ID_MAX_LEN + 1), 5, None])
def test_request_id_rule_refuses_the_rest_naming_the_rule(rid: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_request_id(rid)
    assert info.value.param == "request_id"


def test_engine_follows_the_request_id_rule_for_generate_and_cancel(shared_engine: Callable[[str], mstar.Engine]) -> None:
    engine = shared_engine("fake")
    with pytest.raises(InvalidRequestError, match="use only the characters"):
        engine.generate(text="hi", request_id="a/b")
    with pytest.raises(InvalidRequestError, match="at most 128"):
        engine.cancel("c" * 5_000_000)
    assert engine.generate(text="hi", request_id="fine-id.1").request_id == "fine-id.1"


def test_an_id_accepted_by_generate_can_be_cancelled_by_path(server_for: Callable[[str], ServerThread]) -> None:
    srv = server_for("fake")
    rid = "A.b_c~d-9"
    kwargs = json.dumps({"max_output_tokens": 100000, "step_delay": 0.02})
    with requests.post(srv.url + "/generate", files={"text": (None, "busy"), "request_id": (None, rid), "model_kwargs": (None, kwargs)},
                       stream=True, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["X-Request-Id"] == rid
        cancel = requests.post(srv.url + f"/cancel/{rid}", timeout=10)
        assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
        last = [json.loads(line) for line in resp.iter_lines() if line][-1]
    assert last["metadata"]["finish_reason"] == "cancelled"


def test_early_cancel_stash_is_bounded_and_expires_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    stash = EarlyCancels(ttl=10.0, max_entries=3)
    for rid in ("a", "b", "c", "d"):
        stash.add(rid)
    assert len(stash) == 3 and not stash.take("a")  # the oldest went first
    assert stash.take("d") and not stash.take("d")  # a stashed cancel applies once
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 11.0)
    stash.purge()
    assert len(stash) == 0


def test_engine_forgets_unknown_cancels_without_a_later_cancel(shared_engine: Callable[[str], mstar.Engine]) -> None:
    engine = shared_engine("fake")
    stash = engine.scheduler._early_cancels
    saved = stash.ttl
    stash.ttl = 0.05
    try:
        for i in range(5):
            assert engine.cancel(f"never-{i}") is False
        assert engine.stats()["early_cancels"] >= 5
        deadline = time.monotonic() + 3
        while engine.stats()["early_cancels"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["early_cancels"] == 0  # the idle scheduler purged them
    finally:
        stash.ttl = saved


def test_early_cancel_stash_holds_at_most_its_cap(shared_engine: Callable[[str], mstar.Engine]) -> None:
    engine = shared_engine("fake")
    cap = engine.scheduler._early_cancels.max_entries
    for i in range(cap + 50):
        engine.cancel(f"flood-{i}")
    assert engine.stats()["early_cancels"] <= cap


# --------------------------------------------------------------------------- strict numbers in model kwargs


@pytest.mark.parametrize(("kind", "value"), [(int, "²"), (int, "٣"), (int, "1_000"), (int, " 5"), (int, "7" * 5000),
                                             (float, "nan"), (float, "inf"), (float, "1_0.5"), (float, "١.٥"),
                                             (list, [float("nan"), 1.0]), (list, [0.4, float("inf")])])
def test_params_refuse_what_int_and_float_would_wrongly_accept(kind: type, value: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        Param(kind).coerce("knob", value)
    assert info.value.param == "knob" and len(info.value.message) < 200


def test_params_name_a_huge_integer_without_printing_it() -> None:
    with pytest.raises(InvalidParameterError, match="more than 38 digits"):
        Param(int, max=10).coerce("knob", 10**5000)


# --------------------------------------------------------------------------- remote fetch deadline


class _Trickler:
    """An HTTP server on 127.0.0.1 that sends its answer one byte every ``gap`` seconds."""

    def __init__(self, gap: float, *, slow_headers: bool = False) -> None:
        self.gap = gap
        self.slow_headers = slow_headers
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = int(self.sock.getsockname()[1])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                payload = head if self.slow_headers else b""
                if not self.slow_headers:
                    conn.sendall(head)
                try:
                    for i in range(100000):
                        if self.stop.is_set():
                            break
                        conn.sendall(payload[i:i + 1] if i < len(payload) else b"\x89")
                        time.sleep(self.gap)
                except OSError:
                    pass  # the fetcher hung up: what we want

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(2)


@pytest.mark.slow
@pytest.mark.parametrize("slow_headers", [False, True], ids=["slow-body", "slow-headers"])
def test_a_trickling_server_cannot_extend_the_fetch_deadline(slow_headers: bool) -> None:
    trickler = _Trickler(0.05, slow_headers=slow_headers)
    try:
        t0 = time.monotonic()
        with pytest.raises(MediaError, match="took longer than the 1 s limit"):
            media_io.fetch_remote(f"http://trickle.invalid:{trickler.port}/x.png", max_bytes=1 << 20, timeout=1.0,
                                  resolve=lambda host, port: ["127.0.0.1"])
        elapsed = time.monotonic() - t0
    finally:
        trickler.close()
    assert elapsed < 1.6, f"the fetch held its thread {elapsed:.2f} s past a 1 s deadline"


def test_a_fetch_failure_is_worded_without_errno_or_library_names() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # nothing listens here once closed
    with pytest.raises(MediaError) as info:
        media_io.fetch_remote(f"http://closed.invalid:{port}/a.png", max_bytes=1024, timeout=2.0,
                              resolve=lambda host, port: ["127.0.0.1"])
    message = info.value.message
    assert "refused" in message and "Errno" not in message and "ConnectionRefusedError" not in message


# --------------------------------------------------------------------------- seeds and timeouts, one rule everywhere


@pytest.mark.parametrize("value", ["１２８", "٣", "1_000", " 5", "0x10", "5.0", "7" * 5000, -1, 2**63, True, 1.0, None])
def test_seed_rule_refuses_what_int_would_wrongly_read(value: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        check_seed(value)
    assert info.value.param == "seed" and "2**63-1" in info.value.message and len(info.value.message) < 120


@pytest.mark.parametrize(("value", "seed"), [("0", 0), ("12", 12), (SEED_MAX, SEED_MAX), (str(SEED_MAX), SEED_MAX)])
def test_seed_rule_accepts_ascii_integers_in_range(value: Any, seed: int) -> None:
    assert check_seed(value) == seed


@pytest.mark.parametrize("value", [10**400, -(10**400), 0, -1, 86401, "5", True, float("inf")])
def test_timeout_rule_refuses_out_of_range_without_overflow(value: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        check_timeout(value)
    assert info.value.param == "timeout" and len(info.value.message) < 120


# --------------------------------------------------------------------------- message roles in-process


@pytest.mark.parametrize("role", ["USER", "", "tool", "function", None, 5])
def test_engine_refuses_a_message_role_it_does_not_know(shared_engine: Callable[[str], mstar.Engine], role: Any) -> None:
    with pytest.raises(InvalidRequestError, match="must be one of system, user, assistant|must be an object") as info:
        shared_engine("fake").generate(messages=[{"role": role, "content": "hi"}])
    assert info.value.param == "messages"


# --------------------------------------------------------------------------- upload names


def test_saved_uploads_carry_the_clients_name_and_leave_nothing_behind(tmp_path: Path) -> None:
    from tests.helpers.media import make_png

    scope = media_io.UploadScope(tmp_path, media_io.MediaPolicy())
    names = ["holiday photo.png", "../../etc/passwd.png", "a\x00b\r\n.png", "фото.png", "x" * 400 + ".png"]
    saved = [scope.save_upload(name, make_png())[1] for name in names] + [scope.save(make_png(), ".png", name="..")[1]]
    assert [p.name for p in saved[:4]] == ["holiday photo.png", "passwd.png", "a_b__.png", "фото.png"]
    assert all(p.parent.parent == tmp_path for p in saved), "every name stays inside the upload directory"
    assert len(saved[4].name.encode()) <= 120 and saved[5].name == "upload"
    scope.close()
    assert list(tmp_path.iterdir()) == []


def test_a_decoder_error_names_the_clients_part_not_the_servers_file(server_for: Callable[[str], ServerThread]) -> None:
    from tests.helpers.media import media_recipe

    url = "data:image/png;base64," + base64.b64encode(media_recipe("png_bomb_100k_square")).decode()
    body = {"model": "fakeimg", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    resp = requests.post(server_for("bagel").url + "/v1/chat/completions", json={**body, "model": "bagel"}, timeout=60)
    err = resp.json()["error"]
    assert resp.status_code == 413 and "image 'messages[0].content[0]'" in err["message"], err
    assert re.search(r"[0-9a-f]{32}", err["message"]) is None


# --------------------------------------------------------------------------- the speech WebSocket reads JSON as strictly


def _ws_first_error(srv: ServerThread, *messages: str) -> dict[str, Any]:
    from websockets.sync.client import connect

    with connect(srv.url.replace("http://", "ws://") + "/v1/audio/speech/stream", open_timeout=10) as ws:
        for message in messages:
            ws.send(message)
        event = json.loads(ws.recv(timeout=30))
    assert event["type"] == "error", event
    return dict(event)


@pytest.mark.parametrize(("message", "words"), [
    ('{"type": "session.config", "voice": ' + "[" * 990 + "]" * 990 + "}", "nested too deeply"),
    ('{"type": "session.config", "temperature": NaN}', "NaN"),
    ('{"type": "session.config", "type": "input.text"}', "'type' twice"),
    ('{"type": "session.config", "top_k": "²"}', "type int"),
    ('{"type": "session.config", "max_new_tokens": "١٢"}', "type int"),
    ('{"type": "session.config", "user": 5}', "must be a string"),
], ids=["deep", "nan", "duplicate-key", "kwarg-superscript", "kwarg-arabic-digits", "user-number"])
def test_a_bad_session_config_is_a_400_error_event_before_any_text(server_for: Callable[[str], ServerThread],
                                                                   message: str, words: str) -> None:
    event = _ws_first_error(server_for("orpheus"), message)
    assert event["status"] == 400 and words in event["message"], event


# --------------------------------------------------------------------------- fetch errors in our words


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://host:99999/x.png", "http://host:port/x.png"])
def test_a_malformed_media_url_is_worded_without_library_text(url: str) -> None:
    with pytest.raises(MediaError) as info:
        media_io.fetch_remote(url, max_bytes=1024, timeout=1.0, resolve=lambda host, port: ["127.0.0.1"])
    assert "malformed" in info.value.message and "cast" not in info.value.message and "Port out of range" not in info.value.message


def test_an_unresolvable_host_is_worded_without_errno(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_host(*_args: Any, **_kwargs: Any) -> Any:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(MediaError) as info:
        media_io.fetch_remote("http://nowhere.invalid/x.png", max_bytes=1024, timeout=1.0)
    assert "no address was found" in info.value.message and "Errno" not in info.value.message
