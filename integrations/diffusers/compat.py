"""The diffusers versions and transformer classes this integration supports, with clear errors.

diffusers is an optional extra (``pip install "moeca[diffusers]"``): it is imported here, inside the
integration, never by moeca's core, so the core install and ``moeca run`` stay free of it. The hook API
(``ModelHook``, ``HookRegistry``, ``StateManager``, ``CacheContext``) changed between 0.40 and 0.42, so
the supported range is pinned and checked before anything is attached.
"""
from __future__ import annotations

import importlib.metadata
import re
from types import ModuleType

SUPPORTED_RANGE = (">=0.42", "<0.43")
"""The tested diffusers range (pyproject's ``[diffusers]`` extra pins the same)."""
MIN_VERSION, MAX_EXCLUSIVE = (0, 42), (0, 43)
SUPPORTED_CLASSES = ("HiDreamImageTransformer2DModel",)
"""Transformer classes with a moeca family adapter."""
INSTALL_HINT = 'install the extra: pip install "moeca[diffusers]" (or pip install "diffusers>=0.42,<0.43")'


def _release(version: str) -> tuple[int, int]:
    """``"0.42.1"`` / ``"0.43.0.dev0"`` -> ``(0, 42)`` / ``(0, 43)``; ``(0, 0)`` for an unreadable version."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def check_version(version: str) -> None:
    """Refuse a diffusers version outside :data:`SUPPORTED_RANGE`; the message names the range."""
    release = _release(version)
    if not MIN_VERSION <= release < MAX_EXCLUSIVE:
        raise ImportError(f"moeca's diffusers integration supports diffusers {','.join(SUPPORTED_RANGE)} "
                           f"(its hook API changed between releases); found diffusers {version}. "
                           f"{INSTALL_HINT}")


def require_diffusers() -> ModuleType:
    """Import diffusers (the extra) after checking its version; a missing extra is a clear error."""
    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"moeca's diffusers integration needs the diffusers package; {INSTALL_HINT}",
                                  name="diffusers") from None
    check_version(version)
    import diffusers  # local: the optional extra is imported only when the integration is used
    return diffusers


def check_transformer(transformer: object) -> None:
    """Refuse a transformer class moeca has no adapter for; the message lists the supported ones."""
    name = type(transformer).__name__
    if name not in SUPPORTED_CLASSES:
        raise TypeError(f"moeca's diffusers integration supports {', '.join(SUPPORTED_CLASSES)}; got "
                        f"{type(transformer).__module__}.{name}. Other MoE transformers need their own family "
                        "adapter (see DESIGN section 1b)")
