"""Declaring and validating a model's ``model_kwargs``.

Each runner lists the keys it honours as :class:`Param` entries. Unknown keys
are refused with the accepted list (never silently ignored), and values are
checked for type and range before a request reaches the scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mstar.errors import InvalidParameterError, UnknownParameterError

__all__ = ["Param", "validate_params"]


@dataclass(frozen=True, slots=True)
class Param:
    """One accepted model kwarg: its type, default and allowed range or choices."""

    kind: type  # int, float, str, bool, list or tuple
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    doc: str = ""

    def coerce(self, name: str, value: Any) -> Any:
        if value is None:
            return self.default
        kind = self.kind
        try:
            if kind is bool:
                if isinstance(value, bool):
                    out: Any = value
                elif isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                    out = value.lower() in ("true", "1")
                else:
                    raise TypeError
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                out = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    raise TypeError
                out = float(value)
                if not math.isfinite(out):
                    raise TypeError
            elif kind is str:
                if not isinstance(value, str):
                    raise TypeError
                out = value
            elif kind in (list, tuple):
                if not isinstance(value, (list, tuple)):
                    raise TypeError
                out = tuple(value) if kind is tuple else list(value)
            else:
                out = value
        except (TypeError, ValueError, OverflowError):
            raise InvalidParameterError(
                f"{name} must be of type {kind.__name__}, got {value!r}", param=name
            ) from None
        if self.min is not None and isinstance(out, (int, float)) and out < self.min:
            raise InvalidParameterError(f"{name} must be >= {self.min}, got {out}", param=name)
        if self.max is not None and isinstance(out, (int, float)) and out > self.max:
            raise InvalidParameterError(f"{name} must be <= {self.max}, got {out}", param=name)
        if self.choices is not None and out not in self.choices:
            raise InvalidParameterError(
                f"{name} must be one of {', '.join(map(str, self.choices))}; got {out!r}", param=name
            )
        return out


def validate_params(spec: Mapping[str, Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """Return every accepted key with its value (given or default); refuse unknown keys."""
    unknown = set(given) - set(spec)
    if unknown:
        raise UnknownParameterError(unknown, spec)
    return {name: p.coerce(name, given.get(name)) for name, p in spec.items()}
