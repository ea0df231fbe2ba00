"""The step message rank 0 sends its workers: an op code and ints in a header, plus tensors.

A header is a flat list of int64 (sent as bytes down each worker's pipe); the tensors it
describes follow through the process group, packed into one broadcast per dtype. Nothing
else crosses: no pickled object, nothing per request but tensors and the ints that shape them.

A forward's arguments are encoded by kind: None, an int or bool, a tensor, a list of tensors
(deepstack features), a list of ints, a KV cache (by its id: each rank holds its own storage),
or an :class:`~mstar.layers.attention.AttnBatch` (its tensors and its two int lists).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mstar.layers.attention import AttnBatch
from mstar.parallel.group import Comm

__all__ = ["Op", "Step", "decode_header", "encode_forward", "receive_tensors", "send_tensors"]


class Op:
    """Step op codes."""

    SHUTDOWN = 1
    NEW_CACHE = 2
    FORWARD = 3
    FAIL = 4  # test seam: the worker raises while running the step


_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
_NONE, _INT, _BOOL, _TENSOR, _TENSORS, _INTS, _BATCH, _CACHE = range(8)
_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(AttnBatch))


def dtype_code(dtype: torch.dtype) -> int:
    return _CODE[dtype]


def code_dtype(code: int) -> torch.dtype:
    return _DTYPES[code]


@dataclass(slots=True)
class _Slot:
    """A tensor of the payload, before it arrives."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(slots=True)
class Step:
    """A decoded header: the op, the backbone it runs, pending KV block copies and the arguments
    (parameter index in the method's signature, value with payload slots)."""

    op: int
    backbone: int
    copies: list[tuple[int, int, int]]  # (cache id, source block, destination block), in order
    args: list[tuple[int, Any]]
    slots: list[_Slot]


def header_bytes(ints: list[int]) -> bytes:
    return np.asarray(ints, dtype=np.int64).tobytes()


def parse_ints(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype=np.int64).tolist()


# ----------------------------------------------------------------------------- rank 0


def encode_forward(
    backbone: int,
    copies: list[tuple[int, int, int]],
    args: list[tuple[int, Any]],
    cache_ids: dict[int, int],
) -> tuple[list[int], list[torch.Tensor]]:
    """The header and payload of a forward: ``args`` are (parameter index, value) pairs;
    ``cache_ids`` maps ``id(cache)`` to the id the workers know it by."""
    head = [Op.FORWARD, backbone, len(copies)]
    for c in copies:
        head.extend(c)
    head.append(len(args))
    tensors: list[torch.Tensor] = []
    for index, value in args:
        head.append(index)
        _encode(value, head, tensors, cache_ids)
    return head, tensors


def _encode_tensor(t: torch.Tensor, head: list[int], tensors: list[torch.Tensor]) -> None:
    head.extend((_CODE[t.dtype], t.dim(), *t.shape))
    tensors.append(t)


def _encode(value: Any, head: list[int], tensors: list[torch.Tensor], cache_ids: dict[int, int]) -> None:
    if value is None:
        head.append(_NONE)
    elif isinstance(value, bool):
        head.extend((_BOOL, int(value)))
    elif isinstance(value, int):
        head.extend((_INT, value))
    elif isinstance(value, torch.Tensor):
        head.append(_TENSOR)
        _encode_tensor(value, head, tensors)
    elif isinstance(value, AttnBatch):
        head.append(_BATCH)
        for name in _BATCH_FIELDS:
            _encode(getattr(value, name), head, tensors, cache_ids)
    elif id(value) in cache_ids:
        head.extend((_CACHE, cache_ids[id(value)]))
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        head.extend((_INTS, len(value), *value))
    elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
        head.extend((_TENSORS, len(value)))
        for t in value:
            _encode_tensor(t, head, tensors)
    else:
        raise TypeError(f"a tensor-parallel step carries tensors and ints only, not {type(value).__name__}")


def send_tensors(comm: Comm, tensors: list[torch.Tensor]) -> None:
    """Broadcast the payload from rank 0: one flat buffer per dtype, in the order of the header."""
    for _, group in _by_dtype([(t.dtype, t) for t in tensors]):
        flat = torch.cat([t.reshape(-1).to(comm.device) for t in group])
        if flat.numel():  # the receiver skips empty groups too
            comm.broadcast(_wire(flat))


# ----------------------------------------------------------------------------- workers


def decode_header(ints: list[int]) -> Step:
    """A forward's header back into its op, copies and argument template."""
    op, backbone, n_copies = ints[0], ints[1], ints[2]
    pos = 3
    copies = [(ints[pos + 3 * i], ints[pos + 3 * i + 1], ints[pos + 3 * i + 2]) for i in range(n_copies)]
    pos += 3 * n_copies
    n_args = ints[pos]
    pos += 1
    slots: list[_Slot] = []
    args = []
    for _ in range(n_args):
        index = ints[pos]
        value, pos = _decode(ints, pos + 1, slots)
        args.append((index, value))
    return Step(op, backbone, copies, args, slots)


def _decode_tensor(ints: list[int], pos: int, slots: list[_Slot]) -> tuple[_Slot, int]:
    dtype, ndim = _DTYPES[ints[pos]], ints[pos + 1]
    slot = _Slot(len(slots), dtype, tuple(ints[pos + 2 : pos + 2 + ndim]))
    slots.append(slot)
    return slot, pos + 2 + ndim


def _decode(ints: list[int], pos: int, slots: list[_Slot]) -> tuple[Any, int]:
    kind = ints[pos]
    pos += 1
    if kind == _NONE:
        return None, pos
    if kind == _BOOL:
        return bool(ints[pos]), pos + 1
    if kind == _INT:
        return ints[pos], pos + 1
    if kind == _CACHE:
        return _CacheRef(ints[pos]), pos + 1
    if kind == _TENSOR:
        return _decode_tensor(ints, pos, slots)
    if kind == _INTS:
        n = ints[pos]
        return list(ints[pos + 1 : pos + 1 + n]), pos + 1 + n
    if kind == _TENSORS:
        n, pos = ints[pos], pos + 1
        out = []
        for _ in range(n):
            slot, pos = _decode_tensor(ints, pos, slots)
            out.append(slot)
        return out, pos
    if kind == _BATCH:
        fields = {}
        for name in _BATCH_FIELDS:
            fields[name], pos = _decode(ints, pos, slots)
        return _BatchTemplate(fields), pos
    raise ValueError(f"unknown value kind {kind} in a tensor-parallel step")


@dataclass(slots=True)
class _CacheRef:
    cache_id: int


@dataclass(slots=True)
class _BatchTemplate:
    fields: dict[str, Any]


def receive_tensors(comm: Comm, slots: list[_Slot]) -> list[torch.Tensor]:
    """The payload a header announced, received from rank 0 on ``comm.device``."""
    out: list[torch.Tensor | None] = [None] * len(slots)
    for dtype, group in _by_dtype([(s.dtype, s) for s in slots]):
        sizes = [int(np.prod(s.shape)) for s in group]
        total = sum(sizes)
        if not total:
            for s in group:
                out[s.index] = torch.empty(s.shape, dtype=dtype, device=comm.device)
            continue
        flat = comm.broadcast(torch.empty(total, dtype=_wire_dtype(dtype), device=comm.device)).to(dtype)
        for s, part in zip(group, flat.split(sizes), strict=True):
            out[s.index] = part.view(s.shape)
    return [t for t in out if t is not None]


def materialize(value: Any, tensors: list[torch.Tensor], caches: dict[int, Any]) -> Any:
    """An argument template with its tensors and this rank's caches put in."""
    if isinstance(value, _Slot):
        return tensors[value.index]
    if isinstance(value, _CacheRef):
        return caches[value.cache_id]
    if isinstance(value, _BatchTemplate):
        return AttnBatch(**{k: materialize(v, tensors, caches) for k, v in value.fields.items()})
    if isinstance(value, list) and value and isinstance(value[0], _Slot):
        return [tensors[s.index] for s in value]
    return value


# ----------------------------------------------------------------------------- packing


def _by_dtype(items: list[tuple[torch.dtype, Any]]) -> list[tuple[torch.dtype, list[Any]]]:
    groups: dict[torch.dtype, list[Any]] = {}
    for dtype, item in items:
        groups.setdefault(dtype, []).append(item)
    return sorted(groups.items(), key=lambda kv: _CODE[kv[0]])


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.uint8 if dtype == torch.bool else dtype


def _wire(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()
