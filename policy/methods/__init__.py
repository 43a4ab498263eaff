"""Caching methods, one registered unit each (DESIGN section 2).

Every unit ``policy/methods/<name>.py`` exports a frozen ``Config`` (every knob documented in its
docstring, defaults = the authors'), ``build(config, context) -> Schedule`` (``context`` a
:class:`~.common.Context`) and a one-line ``SUMMARY``. :data:`REGISTRY` lists them; the CLI (``moeca
schedule build METHOD``), the explorer and the benchmarks take method names and knobs from it.

- ``none`` -- full compute; ``moeca`` -- the derivation (:mod:`moeca.policy.derive`);
- ``fora``, ``taylorseer``, ``toca``, ``l2c`` -- step-, feature- and token-level caching as published;
- ``teacache``, ``fbcache``, ``magcache`` -- whole-model skips (TeaCache, diffusers' First-Block Cache
  with DBCache's knobs, diffusers' MagCache).

Fits that run the model (TeaCache's polynomial, L2C's routers, MagCache's ratios, MoECa's wall-clock
costs) live with the engine (:mod:`moeca.replay.fit`, :mod:`moeca.replay.calibrate`) and reach a unit as
knob values or its context.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from .common import Context

METHOD_NAMES = ("none", "moeca", "fora", "taylorseer", "toca", "teacache", "l2c", "fbcache", "magcache")
"""Registered method names (also their ``Schedule.method``), in display order."""
BASELINES = tuple(n for n in METHOD_NAMES if n not in ("none", "moeca"))
"""The published methods MoECa is compared with."""


@dataclass(frozen=True)
class Knob:
    """One knob of a method: ``name``, its type (``int``, ``float``, ``bool``, ``str``, ``floats`` for a
    tuple of floats, ``float?`` for an optional float), ``default`` and ``doc`` (from the Config docstring)."""

    name: str
    type: str
    default: Any
    doc: str

    def parse(self, method: str, text: str) -> Any:
        """The value of ``text`` (a ``--set`` value) for this knob; ValueError naming the knob otherwise."""
        t = self.type
        try:
            if t.endswith("?") and text.strip().lower() in ("none", "null", ""):
                return None
            t = t.rstrip("?")
            if t == "bool":
                low = text.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            if t == "int":
                return int(text)
            if t == "float":
                return float(text)
            if t == "floats":
                return tuple(float(x) for x in text.split(",") if x.strip())
            return text
        except ValueError:
            raise ValueError(f"{method}: knob {self.name} takes {_TYPE_WORDS[t]}, got {text!r}") from None


_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number",
               "floats": "comma-separated numbers", "str": "a string"}
_TYPES = {"int": "int", "float": "float", "bool": "bool", "str": "str", "tuple[float, ...]": "floats",
          "float | None": "float?", "int | None": "int?"}


@dataclass(frozen=True)
class Method:
    """A registered method: its ``name`` and unit ``module`` (``Config``, ``build``, ``SUMMARY``)."""

    name: str
    module: ModuleType

    @property
    def summary(self) -> str:
        return self.module.SUMMARY

    @property
    def Config(self) -> type:  # noqa: N802 (the unit's class)
        return self.module.Config

    def knobs(self) -> list[Knob]:
        """The Config's fields with their type, default and the docstring line that documents them."""
        docs = _field_docs(self.Config.__doc__ or "")
        out = []
        for f in dataclasses.fields(self.Config):
            kind = _TYPES.get(str(f.type))
            if kind is None:
                raise TypeError(f"{self.name}.Config.{f.name}: unsupported knob type {f.type!r}")
            out.append(Knob(f.name, kind, f.default, docs.get(f.name, "")))
        return out

    def config(self, values: Mapping[str, Any] | None = None) -> Any:
        """A Config from knob values (strings are parsed, other values taken as given); unknown names and
        bad values raise ValueError naming the valid knobs / the expected value."""
        knobs = {k.name: k for k in self.knobs()}
        values = dict(values or {})
        unknown = sorted(set(values) - set(knobs))
        if unknown:
            valid = ", ".join(knobs) or "(none: this method has no knobs)"
            raise ValueError(f"{self.name}: unknown knob(s) {', '.join(unknown)}; valid knobs: {valid}")
        parsed = {k: knobs[k].parse(self.name, v) if isinstance(v, str) else v for k, v in values.items()}
        try:
            return self.Config(**parsed)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.name}: {exc}") from None

    def build(self, config: Any, context: Context):
        """``module.build(config, context)`` -> :class:`~moeca.policy.schedule.Schedule`."""
        return self.module.build(config, context)


def _field_docs(doc: str) -> dict[str, str]:
    """``{name: text}`` from docstring lines ``    name: text`` or ``    a / b: text`` (continued by the
    following lines up to a blank line or the next knob)."""
    out: dict[str, str] = {}
    current: list[str] = []
    for line in doc.splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        names = [n.strip() for n in head.split("/")]
        if sep and all(n.isidentifier() for n in names) and line.startswith("    ") and not line.startswith("     "):
            current = names
            for n in names:
                out[n] = rest.strip()
        elif current and stripped:
            for n in current:
                out[n] += " " + stripped
        else:
            current = []
    return out


def _load(name: str) -> Method:
    return Method(name, importlib.import_module(f"{__name__}.{name}"))


REGISTRY: Mapping[str, Method] = {name: _load(name) for name in METHOD_NAMES}
"""Every registered method by name."""


def method(name: str) -> Method:
    """The registered method ``name``; ValueError naming the registered ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(METHOD_NAMES)}") from None


__all__ = ["BASELINES", "Context", "Knob", "METHOD_NAMES", "Method", "REGISTRY", "method"]
