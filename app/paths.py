"""Path guard: the explorer reads only files under its ``--root``.

Every path the app opens goes through :func:`resolve_under` (a path named relative to the root) or
:func:`walk` (discovery). Both refuse ``..`` components, absolute paths and symlinks whose target
leaves the root, so neither a crafted widget value nor a symlink planted in the data folder can make
the app read ``/etc/passwd`` or another user's files.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

SKIP_DIRS = frozenset({"__pycache__", "node_modules", ".git", ".venv", "venv", ".tox", ".mypy_cache",
                       ".pytest_cache", ".ruff_cache", "site-packages"})


class PathOutsideRoot(ValueError):
    """A requested path is absolute, has a ``..`` component, or resolves (via a symlink) outside the root."""


def resolve_root(root: str | os.PathLike) -> Path:
    """The root as an absolute, symlink-free path; it must be an existing directory."""
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"app root {str(root)!r} does not exist; create it or pass an existing --root")
    if not path.is_dir():
        raise NotADirectoryError(f"app root {str(root)!r} is not a directory; pass a folder with --root")
    return path.resolve(strict=True)


def is_within(root: Path, path: Path) -> bool:
    """Whether the *resolved* ``path`` equals ``root`` or lies below it (``root`` must be resolved)."""
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def check_relative(rel: str | os.PathLike) -> PurePosixPath:
    """Validate the *syntax* of a root-relative path: not absolute, no ``..``, no drive, no NUL byte."""
    text = os.fspath(rel)
    if not isinstance(text, str):
        raise PathOutsideRoot(f"path {text!r} must be text")
    if "\x00" in text:
        raise PathOutsideRoot("path contains a NUL byte")
    if text.startswith(("/", "\\", "~")) or PureWindowsPath(text).drive or PureWindowsPath(text).root:
        raise PathOutsideRoot(f"absolute path {text!r} refused: name files relative to the app root")
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if ".." in parts:
        raise PathOutsideRoot(f"path {text!r} refused: '..' components may not leave the app root")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def resolve_under(root: Path, rel: str | os.PathLike, *, must_exist: bool = True) -> Path:
    """Resolve ``rel`` (relative to the resolved ``root``) and check that the real path stays under ``root``.

    Symlinks are followed and then checked: a link inside the root pointing inside the root is fine; one
    pointing outside raises :class:`PathOutsideRoot`. Missing files raise ``FileNotFoundError`` when
    ``must_exist``.
    """
    clean = check_relative(rel)
    candidate = root.joinpath(*clean.parts) if clean.parts else root
    if must_exist and not candidate.exists() and not candidate.is_symlink():
        raise FileNotFoundError(f"{clean} not found under the app root {root}")
    real = candidate.resolve(strict=False)
    if not is_within(root, real):
        raise PathOutsideRoot(f"{clean} resolves to {real}, outside the app root {root}; refused")
    if must_exist and not real.exists():
        raise FileNotFoundError(f"{clean} is a dangling link under the app root {root}")
    return real


def relative_to_root(root: Path, path: Path) -> str:
    """``path`` (under ``root``) as a POSIX root-relative string; ``"."`` for the root itself."""
    rel = path.relative_to(root).as_posix()
    return rel or "."


def walk(root: Path, max_depth: int = 5) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` over ``root`` that never leaves it.

    Yields ``(dir_path, dir_names, file_names)``; hidden and cache folders are skipped, symlinked
    folders are entered only when their target lies under the root (and are never followed twice),
    symlinked files are listed only when their target lies under the root. ``max_depth`` bounds how many
    levels below the root are visited. Like ``os.walk``, the caller may prune ``dir_names`` in place.
    """
    seen: set[Path] = set()
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        current, depth = stack.pop()
        real = current.resolve()
        if real in seen or not is_within(root, real):
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            continue
        dirs, files = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_symlink() and not is_within(root, Path(entry.path).resolve()):
                    continue
                if entry.is_dir():
                    if entry.name not in SKIP_DIRS and not entry.name.endswith(".egg-info"):
                        dirs.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
            except OSError:
                continue
        yield current, dirs, files
        if depth < max_depth:
            for name in reversed(dirs):
                stack.append((current / name, depth + 1))


def redact(root: Path, text: str) -> str:
    """``text`` (an error message) with the server's path of ``root`` removed: paths under it become
    root-relative, so the browser sees the names the explorer lists and nothing of the server's layout."""
    prefix = str(root).rstrip("/")
    return text.replace(prefix + "/", "").replace(prefix, ".")
