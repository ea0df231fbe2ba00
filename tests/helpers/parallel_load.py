"""What rank 0 reads from the checkpoint files while an Engine is built, for the tensor-parallel tests.

:func:`recording_reads` wraps ``safetensors.safe_open``, ``safetensors.torch.load_file`` and
``save_file`` (the loaders import them at call time) and records, per checkpoint name, every read:
``whole`` (a ``get_tensor``, a ``load_file``, or writing a tiny checkpoint on first use) or the
shape of a ``get_slice(...)[...]`` read. Worker processes
are separate and not seen. :func:`assert_rank0_read_only_its_slices` then checks a TP 2 build
against the TP 1 build of the same model (which must read the same names whole: the spy works).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

__all__ = ["Backbone", "Reads", "assert_rank0_read_only_its_slices", "process_gone", "recording_reads", "tiny_engine"]


@dataclass
class Reads:
    """Checkpoint name -> what was read: "whole", or the shape of a slice."""

    by_name: dict[str, list[str | tuple[int, ...]]] = field(default_factory=lambda: defaultdict(list))


class _Slice:
    def __init__(self, inner: Any, name: str, reads: Reads) -> None:
        self._inner, self._name, self._reads = inner, name, reads

    def get_shape(self) -> Any:
        return self._inner.get_shape()

    def __getitem__(self, index: Any) -> torch.Tensor:
        t: torch.Tensor = self._inner[index]
        whole = tuple(t.shape) == tuple(self._inner.get_shape())
        self._reads.by_name[self._name].append("whole" if whole else tuple(t.shape))
        return t


class _Handle:
    def __init__(self, inner: Any, reads: Reads) -> None:
        self._inner, self._reads = inner, reads

    def __enter__(self) -> _Handle:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)

    def keys(self) -> Any:
        return self._inner.keys()

    def metadata(self) -> Any:
        return self._inner.metadata()

    def get_tensor(self, name: str) -> torch.Tensor:
        self._reads.by_name[name].append("whole")
        return self._inner.get_tensor(name)

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self._inner.get_slice(name), name, self._reads)


@contextlib.contextmanager
def recording_reads() -> Iterator[Reads]:
    """Record this process's safetensors reads while the block runs."""
    reads = Reads()
    real_open, real_load, real_save = safetensors.safe_open, safetensors.torch.load_file, safetensors.torch.save_file

    def spy_open(*args: Any, **kwargs: Any) -> _Handle:
        return _Handle(real_open(*args, **kwargs), reads)

    def spy_load(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = real_load(*args, **kwargs)
        for name in out:
            reads.by_name[name].append("whole")
        return out

    def spy_save(tensors: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> None:
        # Writing a tiny checkpoint on first use means it was built whole in this process.
        for name in tensors:
            reads.by_name[name].append("whole")
        real_save(tensors, *args, **kwargs)

    safetensors.safe_open = spy_open  # type: ignore[assignment]
    safetensors.torch.load_file = spy_load
    safetensors.torch.save_file = spy_save
    try:
        yield reads
    finally:
        safetensors.safe_open = real_open
        safetensors.torch.load_file = real_load
        safetensors.torch.save_file = real_save


@dataclass(frozen=True)
class Backbone:
    """One sharded backbone: its module at TP 1 and on rank 0 at TP 2, its checkpoint prefix, and
    the submodules that stay whole on rank 0."""

    tp1: nn.Module
    tp2: nn.Module
    prefix: str
    skip: tuple[str, ...] = ()


def _sharded(b: Backbone) -> dict[str, nn.Parameter]:
    return {
        n: p for n, p in b.tp2.named_parameters()
        if not any(n == s or n.startswith(s + ".") for s in b.skip)
    }


def _nbytes(params: Callable[[], Iterator[tuple[str, nn.Parameter]]], names: set[str]) -> int:
    return sum(p.numel() * p.element_size() for n, p in params() if n in names)


def assert_rank0_read_only_its_slices(tp1_reads: Reads, tp2_reads: Reads, backbones: list[Backbone]) -> None:
    """At TP 2 rank 0 holds about half of each backbone's bytes, each parameter in storage of its own
    size (no view pinning a full tensor), and read every split tensor only as its slices, never whole;
    the TP 1 build read every one of them whole (the spy sees reads)."""
    for b in backbones:
        params = _sharded(b)
        full = dict(b.tp1.named_parameters())
        split = {n for n, p in params.items() if tuple(p.shape) != tuple(full[n].shape)}
        assert split, "nothing was sharded"
        ratio = _nbytes(b.tp2.named_parameters, set(params)) / _nbytes(b.tp1.named_parameters, set(params))
        assert 0.5 <= ratio < 0.56, f"{b.prefix or 'backbone'}: rank 0 holds {ratio:.3f} of the TP 1 bytes"
        for n, p in params.items():
            assert p.device.type != "meta", n
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), f"{n} views a larger storage"
        for n in sorted(split):
            key = b.prefix + n
            assert "whole" in tp1_reads.by_name.get(key, []), f"the TP 1 build did not read {key} (spy broken?)"
            got = tp2_reads.by_name.get(key, [])
            assert got and "whole" not in got, f"rank 0 read {key}: {got}"
            local = tuple(params[n].shape)
            assert all(int(torch.Size(s).numel()) <= int(torch.Size(local).numel()) for s in got), (key, got, local)


@contextlib.contextmanager
def tiny_engine(model: str, tp: int, reads: dict[int, Reads]) -> Iterator[Any]:
    """A tiny fp32 CPU Engine of ``model`` at tensor-parallel ``tp``, closed after the block; what
    rank 0 read from the checkpoint while building it is recorded in ``reads[tp]``."""
    import mstar

    with recording_reads() as reads[tp]:
        engine = mstar.Engine(model, weights="tiny", device="cpu", dtype="float32", tensor_parallel_size=tp)
    with engine:
        yield engine


def process_gone(pid: int) -> bool:
    """True once no process has ``pid`` (a worker that was stopped, or reaped after a kill)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
