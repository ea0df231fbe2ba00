"""The numeric settings a model step runs under, read on the scheduler thread itself.

torch's intra-op thread count and the x86 flush-to-zero / denormals-are-zero bits are per
thread (a new thread copies its creator's bits), so an Engine built on the server's loader
thread could in principle step under other settings than one built on a script's main
thread. :func:`compare_engine_threads` builds one Engine each way (the loader thread through
the server's own ``EngineHolder.load_in_background``) and reads the settings where the steps
run, through the scheduler's per-step hook.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["compare_engine_threads", "process_denormal_bits", "thread_settings"]

_DENORMAL = 1e-39  # below float32's smallest normal (1.18e-38)
_FTZ, _DAZ = 0x8000, 0x0040  # MXCSR flush-to-zero and denormals-are-zero


def thread_settings() -> dict[str, Any]:
    """The settings of the calling thread (and of the OpenMP workers its parallel ops use)."""
    import torch

    one = torch.full((1,), _DENORMAL)
    # Big enough that torch splits it over its OpenMP workers, whose own bits then apply.
    many = torch.full((1 << 20,), _DENORMAL)
    flushed = float(((many * 1.0) == 0).float().mean())
    return {
        "thread": threading.current_thread().name,
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "denormals_flushed_on_thread": bool((one * 1.0).item() == 0.0),
        "denormals_flushed_in_parallel_op": flushed,
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }


def _on_scheduler_thread(engine: Any, submit: Callable[[], Any]) -> dict[str, Any]:
    """:func:`thread_settings` as read inside ``engine``'s next model step (``submit`` starts one)."""
    seen: list[dict[str, Any]] = []

    def hook(_req: Any) -> None:
        if not seen:
            seen.append(thread_settings())

    engine.scheduler.fault_hook = hook
    try:
        submit()
    finally:
        engine.scheduler.fault_hook = None
    if not seen:
        raise RuntimeError("the probe request ran no model step")
    return seen[0]


def compare_engine_threads() -> dict[str, dict[str, Any]]:
    """The scheduler thread's settings for an Engine built on this (main) thread and for one built
    the way the server builds it (``EngineHolder.load_in_background``, as ``create_app`` does).

    Both serve the fake model: these settings belong to threads, not to a model family (the
    runners' one per-thread hook, batch invariance, is the same for every family)."""
    import mstar
    import tests.fake_model  # noqa: F401  (registers "fake")
    from mstar.server.state import EngineHolder

    def build() -> Any:
        return mstar.Engine("fake", device="cpu")

    def probe(engine: Any) -> dict[str, Any]:
        return _on_scheduler_thread(engine, lambda: engine.generate(text="probe", max_output_tokens=2))

    out: dict[str, dict[str, Any]] = {}
    main_engine = build()
    try:
        out["main-thread Engine"] = probe(main_engine)
    finally:
        main_engine.close()
    holder = EngineHolder(model="fake")
    holder.load_in_background(build).join()
    if holder.load_error is not None:
        raise RuntimeError(f"the loader-thread Engine failed to build: {holder.load_error!r}")
    try:
        out["server-style Engine (loader thread)"] = probe(holder.engine)
    finally:
        holder.close()
    return out


def process_denormal_bits(pid: int) -> dict[str, Any]:
    """Every thread's MXCSR flush-to-zero / denormals-are-zero bits in process ``pid``, read with gdb
    (which stops the process for a moment). ``{"error": ...}`` says why they could not be read."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return {"error": "gdb is not installed"}
    try:
        done = subprocess.run(
            # No shared-library symbols: registers need none, and torch's take gdb a minute to read.
            [gdb, "-nx", "-p", str(pid), "-batch", "-iex", "set auto-solib-add off",
             "-ex", "thread apply all info registers mxcsr"],
            capture_output=True, text=True, timeout=120,
        )
    except subprocess.TimeoutExpired:
        return {"error": "gdb did not answer within 120 s"}
    values = [int(v, 16) for v in re.findall(r"^mxcsr\s+(0x[0-9a-f]+)", done.stdout, re.MULTILINE)]
    if not values:
        return {"error": f"gdb read no registers (exit {done.returncode}): {done.stderr.strip()[-300:]}"}
    return {
        "threads": len(values),
        "flush_to_zero": sum(bool(v & _FTZ) for v in values),
        "denormals_are_zero": sum(bool(v & _DAZ) for v in values),
    }
