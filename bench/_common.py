"""Helpers shared by the benchmark scripts: machine facts, tables, JSON results, stats."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP request drowns the tables


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (CPU count, load, library versions, commit)."""
    import torch

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        rev = ""
    info: dict[str, Any] = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git": rev,
    }
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def write_results(name: str, payload: dict[str, Any], directory: Path | None = None) -> Path:
    """Write ``bench/results/<name>.json`` (the folder is gitignored; ``directory`` overrides it)
    and return its path. The file is replaced atomically, so a reader never sees half of it."""
    folder = RESULTS if directory is None else Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    try:
        payload.setdefault("loadavg_at_end", os.getloadavg())
    except OSError:
        pass
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    sys.stdout.flush()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same rows as a Markdown table (floats rounded as in :func:`print_table`)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, p90 and max of ``values`` (empty: all zero)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered),
        "p50": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))],
        "max": ordered[-1],
    }


def parse_ns(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``."""
    out = [int(x) for x in text.split(",") if x.strip()]
    if not out or any(n < 1 for n in out):
        raise SystemExit(f"--n needs positive integers, got {text!r}")
    return out


# ----------------------------------------------------------------------------- budgeted sections


class Sections:
    """Run named sections of a benchmark against one wall-clock budget, recording each in one JSON.

    ``doc["sections"][name]`` gets ``status`` (``ok``, ``error``, ``skipped``), ``elapsed_s``,
    whatever the section put in its record, and for errors the exception and the tail of its
    traceback. The JSON is rewritten when a section starts, whenever a section calls
    :meth:`save` (after each partial result), and when it ends, so a crash or a kill still
    leaves everything measured so far. ``hooks`` are called as ``on_start(rec)`` and
    ``on_end(rec)`` around every section that runs (e.g. GPU peak-memory accounting).
    """

    def __init__(
        self,
        name: str,
        doc: dict[str, Any],
        budget_s: float,
        *,
        directory: Path | None = None,
        on_start: Callable[[dict[str, Any]], None] | None = None,
        on_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.name, self.doc, self.budget_s, self.directory = name, doc, budget_s, directory
        self.on_start, self.on_end = on_start, on_end
        self.t0 = time.monotonic()
        self.current: str | None = None
        self._lock = threading.RLock()
        doc.setdefault("sections", {})
        doc["budget_s"] = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def affordable(self, estimate_s: float, keep_s: float = 0.0) -> bool:
        """Whether ``estimate_s`` more seconds (plus ``keep_s`` held back for later work) fit the budget."""
        return self.remaining() >= estimate_s + keep_s

    def skip_reason(self, estimate_s: float, keep_s: float = 0.0) -> str:
        held = f" (+{keep_s:.0f} s kept for later sections)" if keep_s else ""
        return f"budget: needs ~{estimate_s:.0f} s{held}, {max(self.remaining(), 0.0):.0f} s of {self.budget_s:.0f} s left"

    def save(self) -> Path:
        with self._lock:
            self.doc["elapsed_s"] = round(self.elapsed(), 3)
            for _ in range(3):  # another thread may be adding a key right now: try again
                try:
                    return write_results(self.name, self.doc, self.directory)
                except RuntimeError:
                    time.sleep(0.01)
            return write_results(self.name, self.doc, self.directory)

    def skip(self, name: str, reason: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"status": "skipped", "reason": reason}
        self.doc["sections"][name] = rec
        self.save()
        print(f"[{self.elapsed():6.1f} s] {name}: skipped ({reason})", flush=True)
        return rec

    def run(self, name: str, fn: Callable[[dict[str, Any]], None], *, estimate_s: float, requires: Sequence[str] = ()) -> dict[str, Any]:
        """Run ``fn(rec)`` as section ``name`` unless the budget or a failed prerequisite says not to."""
        for dep in requires:
            status = self.doc["sections"].get(dep, {}).get("status")
            if status != "ok":
                return self.skip(name, f"needs section {dep!r}, which is {status or 'not run'}")
        if not self.affordable(estimate_s):
            return self.skip(name, self.skip_reason(estimate_s))
        rec: dict[str, Any] = {"status": "running", "started_at_s": round(self.elapsed(), 3), "estimate_s": estimate_s}
        self.doc["sections"][name] = rec
        self.current = name
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        self.save()
        t0 = time.monotonic()
        try:
            if self.on_start is not None:
                self.on_start(rec)
            fn(rec)
            rec["status"] = "ok"
        except Exception as exc:  # recorded; the next section still runs
            rec["status"] = "error"
            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rec["traceback_tail"] = traceback.format_exc()[-4000:]
            print(f"  {name} failed: {rec['error'][:300]}", flush=True)
        finally:
            rec["elapsed_s"] = round(time.monotonic() - t0, 3)
            if self.on_end is not None:
                try:
                    self.on_end(rec)
                except Exception as exc:
                    rec["on_end_error"] = repr(exc)
            self.current = None
            self.save()
        print(f"[{self.elapsed():6.1f} s] {name}: {rec['status']} in {rec['elapsed_s']:.1f} s", flush=True)
        return rec

    def start_watchdog(self, grace_s: float, on_timeout: Callable[[], None] | None = None) -> threading.Timer:
        """After ``budget_s + grace_s`` seconds, record where the run was, save, and end the process (exit 3)."""

        def fire() -> None:
            self.doc["watchdog"] = {
                "fired_at_s": round(self.elapsed(), 3),
                "in_section": self.current,
                "note": f"the run passed its budget ({self.budget_s:.0f} s) by {grace_s:.0f} s and was ended",
            }
            if self.current is not None:
                self.doc["sections"][self.current]["status"] = "error"
                self.doc["sections"][self.current]["error"] = "killed by the watchdog (over budget)"
            try:
                self.save()
                if on_timeout is not None:
                    on_timeout()
            finally:
                print(f"watchdog: over budget in section {self.current!r}; partial results saved", file=sys.stderr, flush=True)
                os._exit(3)

        timer = threading.Timer(self.budget_s + grace_s, fire)
        timer.daemon = True
        timer.start()
        return timer


# ----------------------------------------------------------------------------- random weights on a device


@contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    """Make ``dtype`` torch's default floating dtype inside the block (modules are built in it)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def is_norm_weight(name: str) -> bool:
    """RMSNorm / LayerNorm gains (``...norm.weight``, ``..._layernorm.weight``, ``...norm_moe_gen.weight``)."""
    owner, _, leaf = name.rpartition(".")
    return leaf == "weight" and "norm" in owner.rsplit(".", 1)[-1]


def init_random_(module: Any, std: float = 0.02, seed: int = 0) -> None:
    """In place, on the module's device: norm gains 1, biases 0, everything else N(0, std)."""
    import torch

    gen_device = next(module.parameters()).device
    gen = torch.Generator(device=gen_device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # a tied tensor is listed once
            if is_norm_weight(name):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)


def build_random(factory: Callable[[], Any], device: Any, dtype: Any, *, std: float = 0.02, seed: int = 0) -> Any:
    """``factory()`` built directly on ``device`` in ``dtype`` (no CPU copy), then random-initialised there.

    Parameters are created on the device in the target dtype (constructors' own init runs there
    too, then :func:`init_random_` overwrites it); buffers the constructor computes explicitly in
    float32 (rotary tables) stay float32. Returns the module in eval mode.
    """
    import torch

    with torch.device(device), default_dtype(dtype):
        module = factory()
    init_random_(module, std=std, seed=seed)
    return module.eval()
