"""One loop per Engine: admits requests between steps and runs the model runner.

All model work happens on this loop's thread, so a runner never sees two
steps at once; callers on other threads only enqueue requests and set cancel
flags. New requests join between steps, cancelled and timed-out requests are
ended at the top of each iteration (so a cancel takes effect within one
model step), and a failure is contained to the requests it touched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from mstar.errors import ConflictError, RateLimitError, ServiceError
from mstar.models.base import ModelRunner
from mstar.request import Request

__all__ = ["EARLY_CANCEL_MAX", "EARLY_CANCEL_TTL_S", "EarlyCancels", "Scheduler"]

log = logging.getLogger("mstar.scheduler")

# A cancel for an id not yet registered is kept this long, then forgotten.
EARLY_CANCEL_TTL_S = 10.0
# At most this many such cancels are kept (the oldest goes first), so unknown ids cannot pile up.
EARLY_CANCEL_MAX = 1024


class EarlyCancels:
    """Cancels that raced ahead of their request: bounded in number, each expiring after a TTL.

    Not thread-safe on its own; the scheduler calls it under its lock.
    """

    __slots__ = ("_expiry", "max_entries", "ttl")

    def __init__(self, ttl: float = EARLY_CANCEL_TTL_S, max_entries: int = EARLY_CANCEL_MAX) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._expiry: OrderedDict[str, float] = OrderedDict()  # oldest first: all share one TTL

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self.purge(now)
        self._expiry.pop(request_id, None)
        self._expiry[request_id] = now + self.ttl
        while len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)

    def take(self, request_id: str) -> bool:
        """True (once) if a live cancel was stashed for ``request_id``."""
        expiry = self._expiry.pop(request_id, None)
        return expiry is not None and expiry >= time.monotonic()

    def purge(self, now: float | None = None) -> None:
        """Forget expired cancels (the scheduler also calls this while idle, so they expire on their own)."""
        now = time.monotonic() if now is None else now
        while self._expiry:
            oldest, expiry = next(iter(self._expiry.items()))
            if expiry >= now:
                break
            del self._expiry[oldest]


class Scheduler:
    """Runs ``runner.step`` over the active requests on a background thread."""

    def __init__(self, runner: ModelRunner[Any, Any], *, max_active: int = 64, max_waiting: int = 1024) -> None:
        self.runner = runner
        self.max_active = max_active
        self.max_waiting = max_waiting
        #: Test seam: called for each running request before every step; raising fails that request only.
        self.fault_hook: Callable[[Request], None] | None = None
        self._lock = threading.Condition()
        self._inflight: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []
        self._early_cancels = EarlyCancels()
        self._closed = False
        self._step_count = 0
        self._cancel_latencies: list[tuple[int, float]] = []
        self._thread = threading.Thread(target=self._loop, name="mstar-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers' side
    def submit(self, req: Request) -> None:
        with self._lock:
            if self._closed:
                raise ServiceError("the engine is closed")
            if req.request_id in self._inflight:
                raise ConflictError(f"request_id {req.request_id!r} is already in flight")
            if len(self._waiting) >= self.max_waiting:
                raise RateLimitError("the engine's queue is full; retry later", retry_after=1.0)
            if self._early_cancels.take(req.request_id):
                req.request_cancel()
            self._inflight[req.request_id] = req
            self._waiting.append(req)
            self._lock.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Cancel a request by id. Returns True if it was in flight.

        A cancel for an id that is not (yet) in flight is remembered for a
        short while, so a cancel racing ahead of its request still applies.
        """
        with self._lock:
            req = self._inflight.get(request_id)
            if req is None:
                self._early_cancels.add(request_id)
                return False
            req.request_cancel()
            self._lock.notify_all()
            return True

    def is_inflight(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._inflight

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lat = list(self._cancel_latencies)
            return {
                "inflight": len(self._inflight),
                "waiting": len(self._waiting),
                "active": len(self._active),
                "steps": self._step_count,
                "early_cancels": len(self._early_cancels),  # stashed cancels for ids not (yet) in flight
                "cancel_latencies": lat,  # (model steps, seconds) from cancel to stop
                **self.runner.stats().to_dict(),
            }

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        self.runner.on_scheduler_thread()
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._active:
                    self._lock.wait(0.5)
                    self._early_cancels.purge()
                if self._closed:
                    pending = list(self._waiting) + self._active
                    self._waiting.clear()
                    self._active = []
                    break
                self._admit_locked()
                active = list(self._active)
            self._reap(active)
            running = [r for r in active if not r.done]
            if running:
                self._step(running)
            self._reap(active)
        for req in pending:
            req.fail(ServiceError("the engine was closed before this request finished"))
            self._release(req)

    def _admit_locked(self) -> None:
        # Requests cancelled while waiting end without ever taking resources.
        for req in [r for r in self._waiting if r.cancel_requested or r.done]:
            self._waiting.remove(req)
            self._active.append(req)
        while self._waiting and len(self._active) < self.max_active:
            req = self._waiting[0]
            try:
                admitted = self.runner.admit(req)
            except Exception as exc:  # a request the runner cannot ever host
                self._waiting.popleft()
                req.fail(exc)
                self._active.append(req)
                continue
            if not admitted:
                break
            self._waiting.popleft()
            self._active.append(req)

    def _step(self, running: list[Request]) -> None:
        if self.fault_hook is not None:
            for req in running:
                try:
                    self.fault_hook(req)
                except Exception as exc:
                    req.fail(exc)
            running = [r for r in running if not r.done]
            if not running:
                return
        for req in running:
            req.steps += 1
        self._step_count += 1
        try:
            self.runner.step(running)
        except Exception as exc:
            log.exception("model step failed for %d request(s)", len(running))
            for req in running:
                req.fail(exc)

    def _reap(self, reqs: list[Request]) -> None:
        """End cancelled and timed-out requests; release everything that is done."""
        now = time.monotonic()
        finished = []
        for req in reqs:
            if not req.done:
                if req.cancel_requested:
                    req.finish("cancelled")
                elif req.deadline is not None and now > req.deadline:
                    req.finish("timeout")
            if req.done:
                finished.append(req)
        if not finished:
            return
        for req in finished:
            self._release(req)
        with self._lock:
            for req in finished:
                if req in self._active:
                    self._active.remove(req)
                if self._inflight.get(req.request_id) is req:
                    del self._inflight[req.request_id]
                if req.cancel_requested_at is not None and req.stopped_at is not None:
                    steps = req.steps - (req.cancel_requested_step or 0)
                    self._cancel_latencies.append((steps, req.stopped_at - req.cancel_requested_at))
                    del self._cancel_latencies[:-10000]

    def _release(self, req: Request) -> None:
        try:
            self.runner.release(req)
        except Exception:
            log.exception("releasing request %s failed", req.request_id)
