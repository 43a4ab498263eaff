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


def check_utf8_arguments(argv: list[str]) -> None:
    """Refuse an argument holding bytes that are not UTF-8 (a path such as ``--out $'out\\xff'``), naming the
    option and the byte, before anything is written: moeca records paths in its JSON files and prints them, and
    a half-written output would be left behind when that failed."""
    for i, token in enumerate(argv):
        try:
            token.encode("utf-8")
        except UnicodeEncodeError as exc:
            option, value = (token.split("=", 1) if token.startswith("--") and "=" in token
                             else (argv[i - 1] if i and argv[i - 1].startswith("-") else "argument", token))
            shown = os.fsencode(value).decode("utf-8", "backslashreplace")
            byte = os.fsencode(token[exc.start:exc.end]).hex()
            raise ValueError(f"{option} {shown}: the path holds the byte 0x{byte}, which is not UTF-8; moeca writes "
                             "paths into its JSON records, so give a name in UTF-8 (nothing was written)") from None
