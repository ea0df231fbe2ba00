"""The client side of ``/v1/audio/speech/stream``: send text as it is written, hear each sentence.

Needs the ``websockets`` package (``pip install websockets``, or ``pip install mstar[stream]``),
imported only when a stream is opened, so the rest of the client keeps to ``requests``.

>>> with client.speech_stream(voice="tara") as speech:
...     for word in "Hello there. How are you today?".split():
...         speech.send(word + " ")
...     speech.done()
...     for event in speech:          # AudioChunk ... then Finished (with usage)
...         play(event)

Sending and receiving may run on two threads at once (a voice agent feeds LLM tokens on one
and plays audio on the other), which the ``websockets`` synchronous client supports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mstar._sugar import ClosingStream
from mstar.errors import MStarError, ProtocolError, ReadTimeoutError, TransportError, error_for_status
from mstar.types import AudioChunk, Finished, Usage

__all__ = ["SpeechStream", "open_speech_stream"]

PATH = "/v1/audio/speech/stream"


def _websockets_sync() -> Any:
    try:
        from websockets.sync import client
    except ImportError:
        raise ImportError(
            "MStarClient.speech_stream needs the 'websockets' package: pip install websockets "
            "(or pip install 'mstar[stream]')"
        ) from None
    return client


def _ws_url(base_url: str) -> str:
    scheme, _, rest = base_url.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{PATH}"


class SpeechStream(ClosingStream):
    """One WebSocket speech session (see :meth:`mstar.client.MStarClient.speech_stream`).

    :meth:`send` text, :meth:`done` to end the utterance; iterate (or call :meth:`receive`)
    for its :class:`~mstar.types.AudioChunk` events (``metadata``: ``utterance_index``,
    ``sentence_index``) and the :class:`~mstar.types.Finished` that ends the utterance
    (``usage`` summed over its sentences). An error the server reports is raised as the
    matching :mod:`mstar.errors` exception. The session stays open for further utterances
    until :meth:`close`.
    """

    def __init__(self, connection: Any, *, read_timeout: float | None) -> None:
        self._ws = connection
        self._read_timeout = read_timeout
        self._sample_rate = 0
        self._channels = 1
        self._sentence = -1
        self._utterance = 0
        self._closed = False

    def send(self, text: str) -> None:
        """Send a piece of text (a token, a word, a sentence)."""
        self._send({"type": "input.text", "text": text})

    def done(self) -> None:
        """End the utterance: the server speaks what is left, then sends ``Finished``."""
        self._send({"type": "input.done"})

    def receive(self, timeout: float | None = None) -> AudioChunk | Finished:
        """The next event; raises :class:`~mstar.errors.ReadTimeoutError` after ``timeout`` seconds
        (default: the client's read timeout) and the server's error as its exception."""
        wait = self._read_timeout if timeout is None else timeout
        while True:
            msg = self._recv(wait)
            if isinstance(msg, bytes):
                if not self._sample_rate:
                    raise ProtocolError("the server sent audio before audio.start")
                meta = {"utterance_index": self._utterance, "sentence_index": self._sentence}
                return AudioChunk(msg, self._sample_rate, self._channels, metadata=meta)
            event = self._event(msg)
            kind = event.get("type")
            if kind == "audio.start":
                self._sentence = int(event.get("sentence_index", self._sentence + 1))
                self._sample_rate = int(event["sample_rate"])
                self._channels = int(event.get("num_channels", 1))
            elif kind == "session.done":
                self._utterance = int(event.get("utterance_index", self._utterance)) + 1
                self._sentence = -1
                return Finished("stop", Usage.from_dict(event.get("usage")))
            elif kind == "error":
                raise self._error(event)
            # audio.done and anything newer carry nothing the events need

    def __iter__(self) -> Iterator[AudioChunk | Finished]:
        """The events of the current utterance, up to and including its ``Finished``."""
        while True:
            event = self.receive()
            yield event
            if isinstance(event, Finished):
                return

    def close(self) -> None:
        """End the session (the server cancels whatever still runs) and close the connection."""
        if self._closed:
            return
        self._closed = True
        try:
            self._ws.send(json.dumps({"type": "session.close"}))
        except Exception:
            pass  # already closed by the server
        self._ws.close()

    # ------------------------------------------------------------------ wire
    def _send(self, doc: dict[str, Any]) -> None:
        if self._closed:
            raise TransportError("the speech stream is closed")
        try:
            self._ws.send(json.dumps(doc))
        except Exception as exc:
            # A server that refused the session (a wrong key) said why before it closed: raise that.
            reason = self._pending_error()
            if reason is not None:
                raise reason from None
            raise TransportError(f"the speech stream is closed: {exc}") from exc

    def _pending_error(self) -> MStarError | None:
        """The error event the server sent before closing, if one is still unread."""
        try:
            while True:
                msg = self._ws.recv(timeout=0)
                if isinstance(msg, str):
                    event = self._event(msg)
                    if event.get("type") == "error":
                        return self._error(event)
        except Exception:
            return None

    @staticmethod
    def _error(event: dict[str, Any]) -> MStarError:
        return error_for_status(
            int(event.get("status", 500)),
            str(event.get("message", "the server reported an error")),
            code=event.get("code"),
            param=event.get("param"),
        )

    def _recv(self, timeout: float | None) -> str | bytes:
        try:
            msg: str | bytes = self._ws.recv(timeout=timeout)
        except TimeoutError:
            raise ReadTimeoutError(f"no speech event within {timeout} seconds") from None
        except Exception as exc:
            raise TransportError(f"the speech stream closed: {exc}") from exc
        return msg

    @staticmethod
    def _event(text: str) -> dict[str, Any]:
        try:
            doc = json.loads(text)
        except ValueError:
            raise ProtocolError(f"the server sent a frame that is not JSON: {text[:80]!r}") from None
        if not isinstance(doc, dict):
            raise ProtocolError("the server sent a JSON frame that is not an object")
        return doc


def open_speech_stream(
    base_url: str,
    headers: dict[str, str],
    *,
    connect_timeout: float | None,
    read_timeout: float | None,
    config: dict[str, Any],
) -> SpeechStream:
    """Connect, send ``session.config`` and return the stream (the server checks the config then)."""
    ws_client = _websockets_sync()
    auth = {k: v for k, v in headers.items() if k.lower() == "authorization"}
    url = _ws_url(base_url)
    try:
        conn = ws_client.connect(url, additional_headers=auth, open_timeout=connect_timeout, max_size=None)
    except (OSError, TimeoutError) as exc:
        raise TransportError(f"could not open {url}: {exc}") from exc
    except Exception as exc:  # a handshake the server refused
        raise TransportError(f"could not open {url}: {exc}") from exc
    stream = SpeechStream(conn, read_timeout=read_timeout)
    try:
        stream._send({"type": "session.config", "response_format": "pcm", **config})
    except MStarError:
        stream.close()
        raise
    return stream
