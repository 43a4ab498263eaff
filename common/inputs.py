"""Input paths: one message for a missing path and one for the wrong kind of path.

``require_file`` / ``require_folder`` raise :class:`FileNotFoundError` (missing) or
:class:`NotADirectoryError` / :class:`IsADirectoryError` (a file where a folder is expected, or the other
way round) whose message names the input, what it is and the fix, so a folder given as a checkpoint is
not reported as "does not exist". This module imports nothing from moeca.
"""
from __future__ import annotations

import os
from pathlib import Path


def require_file(path: str | os.PathLike, label: str, fix: str) -> Path:
    """``path`` if it is a file (or a link to one); else an error naming ``label`` (e.g. ``--checkpoint``)
    and ``fix`` (what to give instead)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"{label} {path} is a folder, not a file; {fix}")
    raise FileNotFoundError(f"{label} {path} does not exist; {fix}")


def require_folder(path: str | os.PathLike, label: str, fix: str) -> Path:
    """``path`` if it is a folder (or a link to one); else an error naming ``label`` and ``fix``."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{label} {path} is a file, not a folder; {fix}")
    raise FileNotFoundError(f"{label} {path} does not exist; {fix}")
