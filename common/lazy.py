"""Lazy public names for a package ``__init__`` (PEP 562), so importing a moeca package stays cheap.

Usage in a package's ``__init__.py``::

    _EXPORTS = {"Schedule": "schedule", ...}          # public name -> submodule that defines it
    __all__ = sorted(_EXPORTS)
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

A name that moved to another package stays importable from the old one for a while: pass
``moved={"SamplerConfig": "moeca.diffusion"}`` and the old spelling returns the new object with a
``DeprecationWarning`` naming the new import.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any],
                 moved: dict[str, str] | None = None) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return the module-level ``__getattr__`` and ``__dir__`` for ``package``.

    ``exports`` maps each public name to the submodule (relative to ``package``) that defines it; the
    submodule is imported on first access and the value cached in ``namespace`` (the package's globals).
    ``moved`` maps deprecated names to the package that now exports them (not cached: every use warns).
    """
    moved = moved or {}

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        if name in moved:
            warnings.warn(f"{package}.{name} moved: import it from {moved[name]} "
                          f"(from {moved[name]} import {name})", DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
