"""Declaring and validating a model's ``model_kwargs``.

Each runner lists the keys it honours as :class:`Param` entries. Unknown keys
are refused with the accepted list (never silently ignored), and values are
checked for type and range before a request reaches the scheduler.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mstar.describe import ParamSpec
from mstar.errors import InvalidParameterError, UnknownParameterError

__all__ = ["Param", "validate_params"]



def _shown(value: Any) -> str:
    """A value for an error message: short, and safe for integers too long for ``str()``."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return "an integer of more than 38 digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Numbers written as text: ASCII only, at most 40 characters.
_INT_TEXT = re.compile(r"-?[0-9]{1,40}")
_FLOAT_TEXT = re.compile(r"(?=.{1,40}$)-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


@dataclass(frozen=True, slots=True)
class Param:
    """One accepted model kwarg: its type, default and allowed range or choices.

    ``doc`` is its meaning, shown by ``Engine.describe()``; ``type_name`` names the type
    there when ``kind`` alone says too little (``object`` checked by the runner: ``"array"``).
    """

    kind: type  # int, float, str, bool, list, tuple, or object (checked by the runner)
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    doc: str = ""
    type_name: str = ""

    def spec(self, name: str) -> ParamSpec:
        """This parameter as the :class:`~mstar.describe.ParamSpec` that describe() lists."""
        return ParamSpec(
            name=name,
            type=self.type_name or self.kind.__name__,
            default=self.default,
            min=self.min,
            max=self.max,
            choices=self.choices,
            doc=self.doc,
        )

    def coerce(self, name: str, value: Any) -> Any:
        """``value`` checked and converted to ``kind`` (None gives the default); a typed error names the rule."""
        if value is None:
            return self.default
        kind = self.kind
        if kind is not object:
            value = _plain(value)
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
                if isinstance(value, str) and _INT_TEXT.fullmatch(value) is None:
                    raise TypeError  # int() also reads "²", "1_000", " 5 " and 4,000-digit strings
                out = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    raise TypeError
                if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value) is None:
                    raise TypeError  # float() also reads "nan", "inf", "1_0" and non-ASCII digits
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
                if any(isinstance(v, float) and not math.isfinite(v) for v in value):
                    raise InvalidParameterError(f"{name} must hold finite numbers, got {_shown(value)}", param=name)
                out = tuple(value) if kind is tuple else list(value)
            else:
                out = value
        except (TypeError, ValueError, OverflowError):
            raise InvalidParameterError(
                f"{name} must be of type {kind.__name__}, got {_shown(value)}", param=name
            ) from None
        if self.min is not None and isinstance(out, (int, float)) and out < self.min:
            raise InvalidParameterError(f"{name} must be >= {self.min}, got {_shown(out)}", param=name)
        if self.max is not None and isinstance(out, (int, float)) and out > self.max:
            raise InvalidParameterError(f"{name} must be <= {self.max}, got {_shown(out)}", param=name)
        if self.choices is not None and out not in self.choices:
            raise InvalidParameterError(
                f"{name} must be one of {', '.join(map(str, self.choices))}; got {_shown(out)}", param=name
            )
        return out


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (and torch tensors) as the lists and numbers they hold.

    The client sends them as JSON lists and numbers, so the Engine reads them
    the same way: ``robot_state=np.zeros(8)`` means ``[0.0] * 8`` on both sides.
    """
    if isinstance(value, (str, bytes, bool, int, float, list, tuple, dict)) or not hasattr(value, "tolist"):
        return value
    try:
        return value.tolist()
    except (TypeError, ValueError, RuntimeError):
        return value


def validate_params(spec: Mapping[str, Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """Return every accepted key with its value (given or default); refuse unknown keys."""
    unknown = set(given) - set(spec)
    if unknown:
        raise UnknownParameterError(unknown, spec)
    return {name: p.coerce(name, given.get(name)) for name, p in spec.items()}
