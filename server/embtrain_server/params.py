"""Parameter schemas: each loss declares its parameters once (type, default, range, choices) and every
request's parameters are validated against that declaration at the edge, before anything is computed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument, invalid

_KINDS = ("float", "int", "bool", "enum", "str", "object", "float_list", "int_list")


@dataclass(frozen=True)
class Param:
    """One parameter of a loss (or head, optimiser, miner).

    ``minimum``/``maximum`` bound numbers; ``exclusive_minimum``/``exclusive_maximum`` make the bound strict.
    ``allow_inf`` admits +inf for floats (e.g. ``max_dist``). ``nullable`` admits ``None``.
    """

    name: str
    kind: str
    default: Any
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[str, ...] = ()
    allow_inf: bool = False
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}")

    @property
    def range_text(self) -> str:
        if self.kind == "enum":
            return " | ".join(self.choices)
        if self.minimum is None and self.maximum is None:
            return ""
        lo = "" if self.minimum is None else ("(" if self.exclusive_minimum else "[") + _fmt(self.minimum)
        hi = "" if self.maximum is None else _fmt(self.maximum) + (")" if self.exclusive_maximum else "]")
        if self.minimum is not None and self.maximum is not None:
            return f"{lo}, {hi}"
        if self.minimum is not None:
            return (">" if self.exclusive_minimum else ">=") + " " + _fmt(self.minimum)
        return ("<" if self.exclusive_maximum else "<=") + " " + _fmt(self.maximum)  # type: ignore[arg-type]

    def parse(self, value: Any, prefix: str = "params") -> Any:
        """Coerce a wire value (JSON-like) to the declared type, or raise ``InvalidArgument`` naming the field."""
        where = f"{prefix}.{self.name}"
        if value is None:
            if self.nullable:
                return None
            raise invalid(where, f"expected {self._expected()}, got null")
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise invalid(where, f"expected a boolean, got {_show(value)}")
        if self.kind in ("float", "int"):
            return self._number(value, where)
        if self.kind == "enum":
            if isinstance(value, str) and value in self.choices:
                return value
            raise invalid(where, f"expected one of {', '.join(map(repr, self.choices))}, got {_show(value)}")
        if self.kind == "str":
            if isinstance(value, str):
                return value
            raise invalid(where, f"expected a string, got {_show(value)}")
        if self.kind == "object":
            if isinstance(value, Mapping):
                return dict(value)
            raise invalid(where, f"expected an object, got {_show(value)}")
        # lists
        if not isinstance(value, (list, tuple)):
            raise invalid(where, f"expected a list of numbers, got {_show(value)}")
        item = Param(self.name, self.kind.split("_")[0], None, minimum=self.minimum, maximum=self.maximum,
                     exclusive_minimum=self.exclusive_minimum, exclusive_maximum=self.exclusive_maximum)
        return [item._number(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def _number(self, value: Any, where: str) -> float | int:
        if self.allow_inf and isinstance(value, str) and value.lower() in ("inf", "+inf", "infinity", "+infinity"):
            value = float("inf")  # JSON clients (grpcurl) cannot send an infinite number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(where, f"expected {self._expected()}, got {_show(value)}")
        if self.kind == "int":
            if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
                raise invalid(where, f"expected an integer, got {_show(value)}")
            value = int(value)
        else:
            value = float(value)
            if math.isnan(value) or (math.isinf(value) and not (self.allow_inf and value > 0)):
                raise invalid(where, f"expected a finite number{' or +inf' if self.allow_inf else ''}, got {_show(value)}")
        if self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)):
            raise invalid(where, f"expected {self._expected()}, got {_show(value)}")
        if self.maximum is not None and (value > self.maximum or (self.exclusive_maximum and value == self.maximum)):
            raise invalid(where, f"expected {self._expected()}, got {_show(value)}")
        return value

    def _expected(self) -> str:
        base = {"float": "a number", "int": "an integer", "float_list": "a number", "int_list": "an integer"}.get(
            self.kind, self.kind)
        rng = self.range_text
        return f"{base} {rng}".strip() if rng else base


@dataclass(frozen=True)
class Schema:
    """An ordered set of parameters. ``parse`` fills defaults and rejects unknown names."""

    params: tuple[Param, ...] = field(default_factory=tuple)

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def parse(self, values: Mapping[str, Any] | None, prefix: str = "params",
              reject: Mapping[str, str] | None = None) -> dict[str, Any]:
        values = dict(values or {})
        for name, why in (reject or {}).items():
            if name in values:
                raise invalid(f"{prefix}.{name}", why)
        by_name = {p.name: p for p in self.params}
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            valid = ", ".join(self.names()) or "(none)"
            raise InvalidArgument(
                f"{prefix}.{unknown[0]}: unknown parameter; valid parameters are: {valid}", field=f"{prefix}.{unknown[0]}")
        return {p.name: (p.parse(values[p.name], prefix) if p.name in values else p.default) for p in self.params}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
