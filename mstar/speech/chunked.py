"""One long text spoken as several requests at once, heard as one request.

The Engine cuts a long text to speak into sentence-aligned chunks
(:func:`mstar.speech.chunking.chunk_text`) and runs one engine request per chunk, side by
side, so the scheduler batches them: the paragraph takes about as long as its longest chunk
instead of the sum of them. :class:`ChunkedSpeech` is the parent request the caller sees. It

* lets the **first chunk lead**: it is queued alone, and every other chunk is queued the
  moment its first audio has left (or it ended), to join the running batch. Until then the
  first chunk runs as a one-sentence request would, so the long text's time to first audio
  is a short one's; the others still start long before they are heard (a chunk of a few
  sentences is many seconds of speech), so the paragraph as a whole loses nothing;
* passes the chunks' audio on strictly in order: a later chunk's audio waits in that
  chunk's own queue until every chunk before it has finished;
* joins consecutive chunks with a short crossfade (:class:`mstar.speech.seams.SeamJoiner`);
* ends with one ``Finished``: usage summed over the chunks, the parent's seed and id, and
  ``length`` if any chunk stopped at its token limit (else ``stop``);
* fails as a whole: the first chunk that fails ends the parent with that chunk's error (a
  full queue refusing a chunk included), a chunk that times out or is cancelled ends it
  with that reason, and either way the other chunks are cancelled; cancelling the parent
  cancels every chunk.

It needs no thread of its own: each chunk's queue calls :meth:`ChunkedSpeech._on_event`
from the thread that queued the event (the scheduler's), which moves whatever may leave
into the parent's queue.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Sequence
from functools import partial

from mstar.protocol import REQUEST_ID_MAX_LEN
from mstar.request import EventQueue, Request
from mstar.speech.seams import DEFAULT_FADE_MS, SeamJoiner
from mstar.types import AudioChunk, Event, Finished, FinishReason, Usage

__all__ = ["ChunkedSpeech", "chunk_request_id", "chunk_seed"]

# A chunk ending this way ends the whole parent at once (its other chunks are cancelled).
_FATAL: tuple[FinishReason, ...] = ("error", "cancelled", "timeout")


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index`` of a request seeded ``seed``: fixed by the two, so a seeded long
    text gives the same audio every time, and different per chunk, so no two chunks share noise."""
    digest = hashlib.sha256(f"mstar-speech-chunk:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def chunk_request_id(parent_id: str, index: int) -> str:
    """The engine request id of chunk ``index``: ``<parent>~<index>`` (a digest of the parent when
    that would be too long), so logs and stats tie each chunk to its parent."""
    rid = f"{parent_id}~{index}"
    if len(rid) <= REQUEST_ID_MAX_LEN:
        return rid
    return f"{hashlib.sha256(parent_id.encode()).hexdigest()[:32]}~{index}"


class ChunkedSpeech:
    """The parent of the chunk requests of one long text; read through ``events`` like a request.

    ``events`` holds the joined audio, then one ``Finished`` or one exception, as a
    :class:`~mstar.request.Request`'s queue does, so an :class:`~mstar.engine.EventStream`
    reads either. ``on_done`` is called once when the parent has ended (the Engine forgets it).
    """

    __slots__ = (
        "_current",
        "_done",
        "_joiner",
        "_lead_spoke",
        "_lock",
        "_on_done",
        "_queued",
        "_submit",
        "children",
        "events",
        "request_id",
        "seed",
    )

    def __init__(
        self,
        request_id: str,
        children: Sequence[Request],
        *,
        seed: int,
        fade_ms: float = DEFAULT_FADE_MS,
        on_done: Callable[[ChunkedSpeech], None] | None = None,
    ) -> None:
        if not children:
            raise ValueError("a chunked speech request needs at least one chunk")
        self.request_id = request_id
        self.seed = seed
        self.children = list(children)
        self.events = EventQueue()
        self._joiner = SeamJoiner(fade_ms)
        self._on_done = on_done
        self._lock = threading.Lock()
        self._current = 0  # the chunk whose audio is passed on now; those before it have finished
        self._queued = 0  # chunks handed to the scheduler so far (the first, then all)
        self._done = False
        self._lead_spoke = False  # the first chunk's first audio has arrived
        self._submit: Callable[[Request], None] | None = None

    @property
    def done(self) -> bool:
        return self._done

    def start(self, submit: Callable[[Request], None]) -> None:
        """Queue the first chunk with ``submit`` (the scheduler's; it raises the refusal of a full
        queue, and the parent never started); the others follow through it on their own."""
        self._submit = submit
        for i, child in enumerate(self.children):
            child.events.listen(partial(self._on_event, i))
        submit(self.children[0])
        self._queued = 1

    def cancel(self, cancel: Callable[[str], object]) -> bool:
        """Cancel every queued chunk through ``cancel`` (the scheduler's) and queue no more; True if
        the parent was still running."""
        with self._lock:
            if self._done:
                return False
            queued = self.children[: self._queued]
            self._queued = len(self.children)  # the rest are never queued: the parent ends with the first
        # Outside the lock: the scheduler's lock is taken inside, and the scheduler thread calls
        # _on_event (which takes ours) while it may hold its own.
        for child in queued:
            cancel(child.request_id)
        return True

    def usage(self) -> Usage:
        """Token and step counts summed over the chunks, so far."""
        kids = self.children
        return Usage(
            sum(c.input_tokens for c in kids), sum(c.output_tokens for c in kids), sum(c.steps for c in kids)
        )

    # ------------------------------------------------------------------ on the emitting thread
    def _on_event(self, index: int) -> None:
        with self._lock:
            if self._done:
                return
            child = self.children[index]
            try:
                if index > self._current and child.done and child.finish_reason in _FATAL:
                    self._end_early(child)  # a later chunk's failure ends the parent now, not in its turn
                else:
                    self._pump()
            except Exception as exc:  # audio that cannot be joined (a sample rate that changed)
                self._fail(exc)
            follow = self._followers()
        self._queue_followers(follow)

    def _followers(self) -> list[Request]:
        """The chunks to queue now: all but the first, once its first audio left or it ended."""
        if self._done or self._queued != 1:
            return []
        lead = self.children[0]
        if not (self._lead_spoke or lead.done):
            return []
        self._queued = len(self.children)
        return self.children[1:]

    def _queue_followers(self, follow: list[Request]) -> None:
        """Queue ``follow`` outside our lock (the scheduler's lock is taken inside)."""
        assert self._submit is not None
        for child in follow:
            try:
                self._submit(child)
            except Exception as exc:  # a full queue: the parent cannot be spoken whole
                with self._lock:
                    if not self._done:
                        self._fail(exc)
                return

    def _end_early(self, child: Request) -> None:
        if child.finish_reason != "error":
            self._end(child.finish_reason or "cancelled")
            return
        while True:  # the chunk's exception is the last item of its queue
            try:
                item = child.events.get_nowait()
            except queue.Empty:
                return  # not queued yet: we are called again when it is
            if isinstance(item, BaseException):
                self._fail(item)
                return

    def _pump(self) -> None:
        """Pass on whatever the current chunk has queued; move to the next chunk when it finishes."""
        while self._current < len(self.children):
            child = self.children[self._current]
            try:
                item = child.events.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, BaseException):
                self._fail(item)
                return
            if isinstance(item, Finished):
                if item.finish_reason in _FATAL:
                    self._end(item.finish_reason)
                    return
                self._current += 1
                continue
            out: Event | None = item
            if isinstance(item, AudioChunk):
                self._lead_spoke = True
                out = self._joiner.feed(self._current, item)
            if out is not None:
                self.events.put(out)
        last = self._joiner.close()
        if last is not None:
            self.events.put(last)
        self._end("length" if any(c.finish_reason == "length" for c in self.children) else "stop")

    def _cancel_children(self) -> None:
        for child in self.children:
            if not child.done:
                child.request_cancel()  # the scheduler ends it within one step

    def _end(self, reason: FinishReason) -> None:
        self._done = True
        self._cancel_children()
        self.events.put(Finished(reason, self.usage(), self.seed, self.request_id))
        self._finished()

    def _fail(self, exc: BaseException) -> None:
        self._done = True
        self._cancel_children()
        self.events.put(exc)
        self._finished()

    def _finished(self) -> None:
        callback, self._on_done = self._on_done, None
        if callback is not None:
            try:
                callback(self)
            except Exception:
                pass
