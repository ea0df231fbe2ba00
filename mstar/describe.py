"""What a model takes and gives, as data: :func:`describe_model`, ``Engine.describe()``, ``GET /describe``.

One :class:`ModelDescription` holds a family's registry entry (modalities,
default outputs, voices) and one :class:`ParamSpec` per ``model_kwargs`` key
(type, default, range or choices, meaning). The three ways to get one return
the same structure: :func:`describe_model` from the registry without loading
weights (it imports the family's runner class, which needs torch),
``Engine.describe()`` with the engine's own state added, and
``MStarClient.describe()`` from a server's ``GET /describe``.

Torch-free at import: the client parses descriptions with it.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ENGINE_PARAMS", "EngineState", "ModelDescription", "ParamSpec", "build_description", "describe_model"]


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One ``model_kwargs`` key: its type, default, allowed range or choices, and meaning."""

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    doc: str = ""

    @property
    def range(self) -> str:
        """The allowed values in words: ``0 to 1``, ``>= 1``, ``one of a, b`` (empty when any value of the type goes)."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.min is not None and self.max is not None:
            return f"{_num(self.min)} to {_num(self.max)}"
        if self.min is not None:
            return f">= {_num(self.min)}"
        if self.max is not None:
            return f"<= {_num(self.max)}"
        return ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``GET /describe`` sends for this parameter."""
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "min": self.min,
            "max": self.max,
            "choices": None if self.choices is None else list(self.choices),
            "doc": self.doc,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParamSpec:
        """Parse :meth:`to_dict`'s output; raises ``ValueError`` naming what is wrong."""
        if not isinstance(d, Mapping) or not isinstance(d.get("name"), str) or not isinstance(d.get("type"), str):
            raise ValueError(f"a parameter must be an object with string 'name' and 'type', got {str(d)[:80]!r}")
        choices = d.get("choices")
        if choices is not None and not isinstance(choices, list):
            raise ValueError(f"parameter {d['name']!r}: 'choices' must be a list or null")
        return cls(
            name=d["name"],
            type=d["type"],
            default=d.get("default"),
            min=_opt_num(d, "min"),
            max=_opt_num(d, "max"),
            choices=None if choices is None else tuple(choices),
            doc=str(d.get("doc") or ""),
        )


@dataclass(frozen=True, slots=True)
class EngineState:
    """How a running Engine was built: where its weights came from, device, dtype and sizing."""

    weights: str
    device: str
    dtype: str
    sizing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"weights": self.weights, "device": self.device, "dtype": self.dtype, "sizing": dict(self.sizing)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineState:
        """Parse :meth:`to_dict`'s output; raises ``ValueError`` when malformed."""
        if not isinstance(d, Mapping) or not all(isinstance(d.get(k), str) for k in ("weights", "device", "dtype")):
            raise ValueError("'engine' must be an object with string 'weights', 'device' and 'dtype'")
        sizing = d.get("sizing") or {}
        if not isinstance(sizing, Mapping):
            raise ValueError("'engine.sizing' must be an object")
        return cls(str(d["weights"]), str(d["device"]), str(d["dtype"]), dict(sizing))


@dataclass(frozen=True, slots=True)
class ModelDescription:
    """A model family's inputs, outputs, voices and parameters (and, from an Engine, its state).

    ``print(desc)`` gives a table; :meth:`to_dict` is what ``GET /describe`` answers.
    """

    name: str
    description: str
    hub_id: str
    input_modalities: tuple[str, ...]
    output_modalities: tuple[str, ...]
    #: What a request produces when it names no ``output_modalities``.
    default_output_modalities: tuple[str, ...]
    voices: tuple[str, ...] = ()
    default_voice: str | None = None
    params: tuple[ParamSpec, ...] = ()
    #: Set by ``Engine.describe()`` (and by the server once its model is loaded); None from the registry.
    engine: EngineState | None = None

    def param(self, name: str) -> ParamSpec:
        """The spec of parameter ``name``; ``KeyError`` listing the accepted names otherwise."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name!r} has no parameter {name!r}; it accepts: {', '.join(p.name for p in self.params)}")

    @property
    def param_names(self) -> list[str]:
        """Every accepted ``model_kwargs`` key, in declaration order."""
        return [p.name for p in self.params]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the body of ``GET /describe``."""
        return {
            "name": self.name,
            "description": self.description,
            "hub_id": self.hub_id,
            "input_modalities": list(self.input_modalities),
            "output_modalities": list(self.output_modalities),
            "default_output_modalities": list(self.default_output_modalities),
            "voices": list(self.voices),
            "default_voice": self.default_voice,
            "params": [p.to_dict() for p in self.params],
            "engine": None if self.engine is None else self.engine.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelDescription:
        """Parse :meth:`to_dict`'s output (a server's answer); raises ``ValueError`` naming what is wrong."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a model description must be a JSON object, got {type(d).__name__}")
        for key in ("name", "description", "hub_id"):
            if not isinstance(d.get(key), str):
                raise ValueError(f"a model description needs a string {key!r}")
        params = d.get("params") or []
        if not isinstance(params, list):
            raise ValueError("'params' must be a list")
        engine = d.get("engine")
        voice = d.get("default_voice")
        return cls(
            name=d["name"],
            description=d["description"],
            hub_id=d["hub_id"],
            input_modalities=_strings(d, "input_modalities"),
            output_modalities=_strings(d, "output_modalities"),
            default_output_modalities=_strings(d, "default_output_modalities"),
            voices=_strings(d, "voices"),
            default_voice=None if voice is None else str(voice),
            params=tuple(ParamSpec.from_dict(p) for p in params),
            engine=None if engine is None else EngineState.from_dict(engine),
        )

    # ---- display
    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(p.name, p.type, _default_text(p.default), p.range, p.doc) for p in self.params]

    def __str__(self) -> str:
        lines = [
            f"{self.name}: {self.description}",
            f"  weights (default): {self.hub_id}",
            f"  inputs: {', '.join(self.input_modalities)}",
            f"  outputs: {', '.join(self.output_modalities)} (default: {', '.join(self.default_output_modalities)})",
        ]
        if self.voices:
            lines.append(f"  voices: {', '.join(self.voices)} (default: {self.default_voice})")
        if self.engine is not None:
            e = self.engine
            lines.append(f"  engine: weights={e.weights} device={e.device} dtype={e.dtype}")
        head = ("parameter", "type", "default", "range", "meaning")
        rows = self._rows()
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        lines.append("")
        for r in [head, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
        return "\n".join(lines)

    def __repr__(self) -> str:
        voices = f", {len(self.voices)} voices" if self.voices else ""
        state = f", engine on {self.engine.device}" if self.engine is not None else ""
        return (
            f"ModelDescription({self.name!r}, in: {'/'.join(self.input_modalities)}, "
            f"out: {'/'.join(self.output_modalities)} (default {'/'.join(self.default_output_modalities)}), "
            f"{len(self.params)} params{voices}{state})"
        )

    def _repr_html_(self) -> str:
        """Jupyter shows the summary and the parameter table."""
        esc = html.escape
        cells = "".join(
            "<tr>"
            + "".join(f"<td><code>{esc(c)}</code></td>" if i < 3 else f"<td>{esc(c)}</td>" for i, c in enumerate(r))
            + "</tr>"
            for r in self._rows()
        )
        summary = esc(str(self).split("\n\n", 1)[0]).replace("\n", "<br>")
        head = "".join(f"<th>{h}</th>" for h in ("parameter", "type", "default", "range", "meaning"))
        return f"<div><p>{summary}</p><table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table></div>"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**63 else str(x)


def _default_text(value: Any) -> str:
    return "-" if value is None else repr(value)


def _opt_num(d: Mapping[str, Any], key: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter {d.get('name')!r}: {key!r} must be a number or null")
    return value


def _strings(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = d.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} must be a list of strings")
    return tuple(value)


#: The keys every model takes besides its own (the Engine reads them itself).
ENGINE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec(
        "seed", "int", None, 0, 2**63 - 1,
        doc="random seed; default: derived from the request id, so a retry with the same id repeats",
    ),
    ParamSpec(
        "timeout", "float", None, 0, 86400,
        doc="seconds (> 0) before the request ends with finish_reason 'timeout'; default: the engine's request_timeout",
    ),
)


def describe_model(name: str) -> ModelDescription:
    """A family's description from the registry, without building an Engine or loading weights.

    Imports the family's runner class (so it needs torch) to read its declared parameters.
    Raises :class:`~mstar.errors.UnknownModelError` for a name the registry does not know.
    """
    from mstar.registry import get_model_info, load_runner_class

    return build_description(get_model_info(name), load_runner_class(name).params)


class _ModelFacts(Protocol):
    """What a description reads from a registry entry (``mstar.registry.ModelInfo``)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def hub_id(self) -> str: ...
    @property
    def input_modalities(self) -> tuple[str, ...]: ...
    @property
    def output_modalities(self) -> tuple[str, ...]: ...
    @property
    def default_outputs(self) -> tuple[str, ...]: ...
    @property
    def voices(self) -> tuple[str, ...]: ...
    @property
    def default_voice(self) -> str | None: ...


class _Describable(Protocol):
    """What a runner's parameter offers here (``mstar.models.params.Param``); a protocol so this
    module does not import ``params``, which imports :class:`ParamSpec` from here."""

    def spec(self, name: str) -> ParamSpec: ...


def build_description(
    info: _ModelFacts, params: Mapping[str, _Describable], engine: EngineState | None = None
) -> ModelDescription:
    """Assemble a description from a :class:`~mstar.registry.ModelInfo` and a runner's ``params``
    (:class:`~mstar.models.params.Param` by name); the Engine's own keys come last."""
    specs = tuple(p.spec(n) for n, p in params.items()) + ENGINE_PARAMS
    return ModelDescription(
        name=info.name,
        description=info.description,
        hub_id=info.hub_id,
        input_modalities=tuple(info.input_modalities),
        output_modalities=tuple(info.output_modalities),
        default_output_modalities=tuple(info.default_outputs),
        voices=tuple(info.voices),
        default_voice=info.default_voice,
        params=specs,
        engine=engine,
    )
