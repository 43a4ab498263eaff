"""Output discipline of every moeca command that writes (DESIGN section 6b).

- :func:`atomic_file`: a single file is written to a temporary sibling, fsynced and renamed into place.
- :func:`output_dir`: a folder is built in a temporary sibling and installed with a manifest
  (``.moeca-manifest.json``) listing every file moeca wrote. An existing folder is replaced only if
  it has such a manifest, and then only the listed entries are removed: anything else the user put
  there stays. A non-empty folder without a manifest is refused.
- :func:`check_no_overlap`: an output may not equal, contain or lie inside one of the command's inputs
  (after resolving symbolic links).
- :func:`os_errors`: permission, read-only, disk-full and missing-folder errors become one-line
  :class:`OutputError` messages naming the path and the fix; temporary files are removed first.
- Single files moeca wrote are recorded in a sidecar ``.moeca-files.json`` in their folder (name ->
  size, modification time and SHA-256 of the bytes written; the hash is compared when the time differs). :func:`atomic_file` replaces an existing file only when the
  sidecar (or the folder's manifest) vouches for it and its bytes are unchanged; any other file needs
  ``overwrite=True`` (the commands' ``--overwrite``). A file the user edited after moeca wrote it is the
  user's again.
- Temporary folders carry a marker file (``.moeca-temporary``, with the pid that made them) until they are
  installed (so a kill at the final rename leaves a marked, removable folder); the next :func:`output_dir` on
  the same output removes stale ones (name pattern AND marker AND a dead pid) and nothing else. A file's
  temporary (``.STEM.tmp-HOST-PID.SUFFIX``) is removed by the next :func:`atomic_file` of that file (this
  host, dead pid), and the sidecar records the file as *pending* before the rename, so a kill between the
  rename and the final record leaves a file moeca still recognises as its own.
- :func:`output_lock`: one writer per output (``flock`` on a hidden ``.NAME.lock`` sibling); a second one
  is refused at once, naming the pid that holds it. :func:`output_dir` and :func:`atomic_file` take it.
- Hidden siblings keep within :data:`NAME_MAX` (:func:`sibling_prefix`), so a legal 255-byte name works.

This module imports nothing from moeca, so every package may use it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

MANIFEST = ".moeca-manifest.json"
MANIFEST_FORMAT = 1
FILES_SIDECAR = ".moeca-files.json"
TMP_MARKER = ".moeca-temporary"


class OutputError(ValueError):
    """An output refused or failed; the message names the path, the problem and the fix."""


# ----------------------------------------------------------------------------- OS errors
_ERRNO_HINTS = {
    errno.EACCES: ("permission denied", "fix the permissions of that path or choose one you may use"),
    errno.EPERM: ("operation not permitted", "fix the permissions of that path or choose one you may use"),
    errno.EROFS: ("the file system is read-only", "choose a folder on a writable disk"),
    errno.ENOSPC: ("the disk is full", "free some space or choose a folder on another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or choose a folder on another disk"),
    errno.ENOENT: ("a folder on the path does not exist", "create it first or fix the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path"),
    errno.EISDIR: ("the path is a folder, not a file", "give a file path"),
    errno.ENAMETOOLONG: ("the path is too long", "choose a shorter path"),
    errno.EEXIST: ("the path already exists", "choose another path"),
}


def describe_os_error(exc: OSError, what: str | None = None) -> str:
    """``cannot write WHAT: REASON (PATH); FIX.`` for an :class:`OSError` raised while writing ``what``;
    ``REASON (PATH); FIX`` when ``what`` is None (the operation is unknown)."""
    reason, fix = _ERRNO_HINTS.get(exc.errno, (exc.strerror or str(exc), "check the path and try again"))
    where = f" ({exc.filename})" if exc.filename else ""
    if what is None:
        return f"{reason}{where}; {fix}"
    return f"cannot write {what}: {reason}{where}; {fix}. No partial output was left behind"


def _remove(paths: Iterable[Path]) -> None:
    for p in paths:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass  # best effort: the original error is what the user needs to see


@contextmanager
def os_errors(what: str, *cleanup: Path) -> Iterator[None]:
    """Translate an :class:`OSError` in the block into an :class:`OutputError` about writing ``what``.

    ``cleanup`` paths (temporary files or folders) are removed when the block fails for any reason.
    """
    try:
        yield
    except OutputError:
        _remove(cleanup)
        raise
    except OSError as exc:
        _remove(cleanup)
        if exc.errno is None:        # raised by moeca with its own message, not by the OS
            raise
        raise OutputError(describe_os_error(exc, what)) from exc
    except BaseException:
        _remove(cleanup)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- sibling names
NAME_MAX = 255
"""Longest file name (bytes) on the file systems moeca writes to (ext4, xfs, btrfs, tmpfs, APFS)."""


def sibling_prefix(name: str, tag: str, reserve: int) -> str:
    """``.NAME.TAG-``: the start of a hidden sibling's name (temporary, old copy, lock) of the output ``name``,
    leaving ``reserve`` bytes for what follows within :data:`NAME_MAX`. A name too long for that keeps its
    first part and gains ``~`` and 8 hex digits of its hash, so a legal 255-byte output name still gets
    legal temporaries, and each output keeps its own."""
    plain = f".{name}.{tag}-"
    if len(os.fsencode(plain)) + reserve <= NAME_MAX:
        return plain
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    room = NAME_MAX - reserve - len(os.fsencode(f"..{tag}-~{digest}"))
    head = name
    while head and len(os.fsencode(head)) > room:
        head = head[:-1]
    return f".{head}~{digest}.{tag}-"


def _host_tag() -> str:
    """8 hex digits naming this machine (temporaries on a shared disk are cleaned only by their own host)."""
    host = os.uname().nodename if hasattr(os, "uname") else ""
    return hashlib.sha256(host.encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- locks
def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


@contextmanager
def output_lock(out: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on the output ``out`` (POSIX ``flock`` on a hidden ``.NAME.lock-`` sibling holding
    the pid) for the block; a second moeca writer of the same output is refused at once with
    ``OPTION OUT is in use by another moeca process (pid N)`` instead of failing later in the middle of its
    work. The lock file goes when the block ends; one a killed process left is taken over (the kernel released
    its lock)."""
    try:
        import fcntl  # POSIX only: where it is missing (Windows) there is no lock
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    out = Path(out)
    if not out.parent.is_dir():      # nothing can be written there: the writer's own check names the problem
        yield
        return
    lock = out.parent / (sibling_prefix(out.name, "lock", 0)[:-1])
    while True:
        with os_errors(f"the lock of {option} {out}"):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputError(f"{option} {out} is in use by another moeca process"
                              + (f" (pid {holder})" if holder else "") + "; wait for it to finish, or choose another "
                              f"{option}") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                   # the holder removed it between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


# ----------------------------------------------------------------------------- overlap
def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def check_no_overlap(out: str | os.PathLike, inputs: Sequence[tuple[str, str | os.PathLike | None]],
                     option: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (``(label, path)`` pairs).

    Paths are compared after resolving symbolic links, so a link into an input is caught too.
    """
    o = _resolved(out)
    for label, path in inputs:
        if path is None:
            continue
        r = _resolved(path)
        if o == r:
            raise OutputError(f"{option} {out} is the same path as the input {label} {path}; writing there would "
                              f"destroy the input. Choose another {option}")
        if _inside(o, r):
            raise OutputError(f"{option} {out} lies inside the input {label} {path}; writing there would change "
                              f"the input. Choose an {option} outside {path}")
        if _inside(r, o):
            raise OutputError(f"{option} {out} contains the input {label} {path}; replacing it could delete the "
                              f"input. Choose an {option} that does not contain {path}")


# ----------------------------------------------------------------------------- single files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_sidecar(folder: Path, key: str = "files") -> dict[str, dict]:
    """``{file name: {"bytes": int, "mtime_ns": int, "sha256": str}}`` from ``folder``'s sidecar (``key``
    ``files``: what moeca wrote; ``pending``: what it was about to rename into place when it last wrote the
    sidecar); {} when absent or damaged (a damaged sidecar vouches for nothing, so every file in the folder
    counts as the user's)."""
    try:
        data = json.loads((folder / FILES_SIDECAR).read_text())
        files = data.get(key, {}) if data.get("written_by") == "moeca" else {}
        return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}


def _matches(path: Path, entry: dict) -> bool:
    """Whether the file ``path`` holds the bytes a sidecar ``entry`` records."""
    try:
        st = path.stat()
        if entry.get("bytes") != st.st_size:
            return False
        if entry.get("mtime_ns") == st.st_mtime_ns:          # untouched since moeca wrote it: skip the hash
            return True
        return entry.get("sha256") == _sha256(path)         # e.g. after a copy or a clone
    except OSError:
        return False


def written_by_moeca(path: str | os.PathLike) -> bool:
    """True when moeca wrote the file ``path`` and nobody changed it since: its folder's sidecar records
    its size and SHA-256 (as written, or as about to be renamed into place by a run killed before it could
    record it), or its folder's manifest lists it."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    entries = [e for e in (_read_sidecar(path.parent).get(path.name),
                           _read_sidecar(path.parent, "pending").get(path.name)) if e is not None]
    if entries:
        return any(_matches(path, e) for e in entries)
    try:
        return path.name in (read_manifest(path.parent) or [])
    except OutputError:
        return False


def check_replace_file(path: str | os.PathLike, what: str = "output file", overwrite: bool = False,
                       flag: str | None = "--overwrite") -> None:
    """Refuse to replace an existing file at ``path`` that moeca did not write, unless ``overwrite``.

    ``flag`` names the option that allows it (None: the command has none; the user must move the file).
    Call it before a long computation; :func:`atomic_file` checks again before it writes.
    """
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"cannot write {what} {path}: it is a symbolic link; moeca will not write through links. "
                          "Give the real path")
    if path.is_dir():
        raise OutputError(f"cannot write {what} {path}: it is a folder; give a file path")
    if not path.exists() or overwrite or written_by_moeca(path):
        return
    how = f"pass {flag} to replace it, or choose another path" if flag else "move it away or choose another path"
    raise OutputError(f"{what} {path} already exists and moeca did not write it (or it changed since; "
                      f"{FILES_SIDECAR} beside it records what moeca wrote); {how}")


def _entry(path: Path, known: dict | None = None) -> dict:
    st = path.stat()
    if known and known.get("bytes") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return dict(known)                                   # the same file (renamed): no second hash
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _record_file(path: Path, pending_from: Path | None = None) -> None:
    """Add ``path`` (just written) to its folder's sidecar; with ``pending_from`` (its temporary, about to be
    renamed to ``path``), record it as pending instead, so a kill between the rename and the final record
    still leaves a file moeca recognises. Best effort: a failure only means the file will later count as the
    user's, which is the safe side."""
    folder = path.parent
    tmp = folder / f".{FILES_SIDECAR}.tmp-{os.getpid()}"
    try:
        files, pending = _read_sidecar(folder), _read_sidecar(folder, "pending")
        if pending_from is not None:
            pending[path.name] = _entry(pending_from)
        else:
            files[path.name] = _entry(path, pending.pop(path.name, None))
        files = {k: v for k, v in files.items() if (folder / k).is_file()}
        data = {"written_by": "moeca", "format": 1, "files": files, **({"pending": pending} if pending else {})}
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, folder / FILES_SIDECAR)
    except OSError:
        tmp.unlink(missing_ok=True)


def _file_temporary(path: Path) -> tuple[str, str]:
    """(start, end) of the names of ``path``'s temporaries: ``.STEM.tmp-HOST-PID.SUFFIX`` within NAME_MAX."""
    return sibling_prefix(path.stem, "tmp", 8 + 1 + 10 + len(os.fsencode(path.suffix))) + _host_tag() + "-", \
        path.suffix


def remove_stale_file_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of the single-file output ``path`` that a killed moeca run on this host left
    (name pattern with this host's tag AND a dead pid); nothing else. Returns what was removed."""
    path = Path(path)
    start, end = _file_temporary(path)
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        middle = name[len(start):len(name) - len(end)] if end else name[len(start):]
        if name.startswith(start) and name.endswith(end) and middle.isdigit():
            candidate = path.parent / name
            if int(middle) != os.getpid() and not _pid_alive(int(middle)) and candidate.is_file() \
                    and not candidate.is_symlink():
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


def adopt_file(path: str | os.PathLike) -> None:
    """Record the existing file ``path`` as replaceable by moeca, because the user said so (``--overwrite``)
    for a writer deeper down: :func:`atomic_file` then replaces it as long as its bytes do not change."""
    path = Path(path)
    if path.is_file() and not path.is_symlink():
        _record_file(path)


@contextmanager
def replaced_file(path: str | os.PathLike, tmp: str | os.PathLike) -> Iterator[Path]:
    """Write one of moeca's own state files, inside a folder moeca owns (a trace's ``run.json``, sample
    shards, a sweep's state, the calibration cache), through ``tmp``: a sibling the caller names so that its
    own clean-up recognises leftovers. Yields ``tmp``; on success it is fsynced and renamed over ``path``; on
    any failure it is removed and the error goes on unchanged. No ownership record is written: outputs a
    user may own go through :func:`atomic_file`."""
    path, tmp = Path(path), Path(tmp)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_file(path: str | os.PathLike, what: str = "output file", make_parents: bool = False,
                overwrite: bool = False, flag: str | None = "--overwrite") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is fsynced and renamed to ``path``.

    The temporary name keeps ``path``'s suffix (writers that pick the format from it still work).
    On any failure the temporary file is removed; an OSError becomes an :class:`OutputError`.
    An existing file is replaced only if moeca wrote it (see :func:`check_replace_file`) or ``overwrite``;
    the written file is recorded in the folder's sidecar.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {what} {path}: it is a folder; give a file path")
    check_replace_file(path, what, overwrite, flag)
    parent = path.parent
    if make_parents:
        with os_errors(f"{what} {path}"):
            parent.mkdir(parents=True, exist_ok=True)
    elif not parent.is_dir():
        raise OutputError(f"cannot write {what} {path}: the folder {parent} does not exist; create it first or "
                          "fix the path")
    start, end = _file_temporary(path)
    tmp = parent / f"{start}{os.getpid()}{end}"
    with output_lock(path, what), os_errors(f"{what} {path}", tmp):
        remove_stale_file_temporaries(path)
        yield tmp
        _fsync_file(tmp)
        check_replace_file(path, what, overwrite, flag)     # again: the user may have put a file there meanwhile
        _record_file(path, pending_from=tmp)
        os.replace(tmp, path)
        _record_file(path)
        _fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "output file",
                      make_parents: bool = False, overwrite: bool = False, flag: str | None = "--overwrite") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`); returns the path."""
    with atomic_file(path, what, make_parents, overwrite, flag) as tmp:
        tmp.write_text(text)
    return Path(path)


# ----------------------------------------------------------------------------- manifests
def _list_files(root: Path, entries: Iterable[str] | None = None) -> list[str]:
    """Relative POSIX paths of every file and symbolic link under ``root`` (or its ``entries``)."""
    out = []
    tops = sorted(os.listdir(root)) if entries is None else list(entries)
    for top in tops:
        p = root / top
        if p.is_symlink() or not p.is_dir():
            if p.exists() or p.is_symlink():
                out.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            rel = Path(dirpath).relative_to(root)
            out += [(rel / n).as_posix() for n in filenames]
            out += [(rel / n).as_posix() for n in dirnames if (Path(dirpath) / n).is_symlink()]
    return sorted(out)


def read_manifest(folder: Path, option: str = "--out") -> list[str] | None:
    """The files listed in ``folder``'s manifest; None when it has none. A damaged manifest is refused."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("written_by") != "moeca" or not isinstance(files, list):
            raise ValueError("not a moeca manifest")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"{option} {folder}: its {MANIFEST} is damaged ({exc}); moeca will not guess what it "
                          f"wrote there. Move the folder away or choose another {option}") from None
    bad = [f for f in files if not isinstance(f, str) or not f or Path(f).is_absolute() or ".." in Path(f).parts
           or f == MANIFEST]
    if bad:
        raise OutputError(f"{option} {folder}: its {MANIFEST} lists paths outside the folder ({bad[:3]}); moeca "
                          f"will not remove them. Move the folder away or choose another {option}")
    return files


def _write_manifest(folder: Path, files: list[str], command: str) -> None:
    data = {"written_by": "moeca", "format": MANIFEST_FORMAT, "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": sorted(files)}
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        _fsync_file(tmp)
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _top(files: Iterable[str]) -> set[str]:
    return {Path(f).parts[0] for f in files}


def _foreign(folder: Path, listed: list[str]) -> list[str]:
    """Files inside the manifest's top-level entries of ``folder`` that neither the manifest nor a manifest
    of a subfolder moeca wrote (e.g. a report rewritten in place by ``moeca analyze``) lists."""
    tops = [t for t in sorted(_top(listed)) if (folder / t).exists() or (folder / t).is_symlink()]
    known = set(listed)
    for f in listed:
        sub = Path(f).parent
        if Path(f).name == MANIFEST and sub != Path("."):
            try:
                known |= {(sub / g).as_posix() for g in read_manifest(folder / sub) or []}
            except OutputError:
                pass  # a damaged nested manifest vouches for nothing
    return sorted(set(_list_files(folder, tops)) - known)


def remove_listed(folder: str | os.PathLike, option: str = "--out") -> list[str]:
    """Remove what ``folder``'s manifest says moeca wrote (and the manifest); keep everything else.

    Refuses (removing nothing) when the folder has no manifest or a listed folder holds files the
    manifest does not list. Returns the removed top-level entries.
    """
    folder = Path(folder)
    listed = read_manifest(folder, option)
    if listed is None:
        raise OutputError(f"{option} {folder} has no {MANIFEST}, so moeca cannot tell what it wrote there; move "
                          f"the folder away or choose another {option}")
    foreign = _foreign(folder, listed)
    if foreign:
        raise OutputError(f"{option} {folder}: {', '.join(foreign[:5])} were not written by moeca but lie inside "
                          f"folders it wrote; move them out first or choose another {option}")
    removed = []
    with os_errors(f"{option} {folder}"):
        for top in sorted(_top(listed)):
            p = folder / top
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            else:
                continue
            removed.append(top)
        (folder / MANIFEST).unlink(missing_ok=True)
    return removed


def record_manifest(folder: str | os.PathLike, entries: Iterable[str], command: str = "") -> None:
    """Add every file under the top-level ``entries`` of ``folder`` to its manifest (created if absent)."""
    folder = Path(folder)
    listed = read_manifest(folder) or []
    present = [e for e in entries if (folder / e).exists() or (folder / e).is_symlink()]
    with os_errors(f"the manifest of {folder}"):
        _write_manifest(folder, sorted(set(listed) | set(_list_files(folder, present))), command)


# ----------------------------------------------------------------------------- temporaries
def _mark_temporary(folder: Path) -> None:
    """Write the marker that lets a later run recognise ``folder`` as a temporary moeca made."""
    (folder / TMP_MARKER).write_text(json.dumps({"written_by": "moeca", "pid": os.getpid(),
                                                 "host": os.uname().nodename if hasattr(os, "uname") else ""}))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True                                      # exists (another user's) or unknown: keep it
    return True


def _is_stale_temporary(path: Path) -> bool:
    """A folder moeca made as a temporary (its marker says so) whose process on this host is gone."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        data = json.loads((path / TMP_MARKER).read_text())
        pid, host = int(data["pid"]), data.get("host", "")
        if data.get("written_by") != "moeca":
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    here = os.uname().nodename if hasattr(os, "uname") else ""
    if host != here:
        return False                                     # another machine's run (shared disk): cannot tell
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings (``.NAME.tmp-*``, ``.NAME.old-*``) of the output folder ``out`` that a
    killed moeca run left: only those with moeca's marker and a dead pid. Returns what was removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    prefixes = (sibling_prefix(out.name, "tmp", 8), sibling_prefix(out.name, "old", 10))  # as text: no globbing
    removed = []
    for name in sorted(os.listdir(out.parent)):
        p = out.parent / name
        if name.startswith(prefixes) and _is_stale_temporary(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- folders
def check_output_dir(out: str | os.PathLike, inputs: Sequence[tuple[str, str | os.PathLike | None]] = (),
                     option: str = "--out") -> None:
    """The checks :func:`output_dir` makes before writing, for commands that compute a long time first."""
    check_no_overlap(out, inputs, option)
    _check_replaceable(Path(out), option)


def _check_replaceable(out: Path, option: str) -> list[str] | None:
    """None when ``out`` is absent or empty; the manifest's files when moeca may replace it; else refuse."""
    if out.is_symlink():
        raise OutputError(f"{option} {out} is a symbolic link; moeca replaces output folders by renaming and will "
                          f"not follow links. Give the real path")
    here = Path.cwd().resolve()
    if _resolved(out) == here or _resolved(out) in here.parents:
        raise OutputError(f"{option} {out} is the current folder or one above it; moeca replaces its output folder "
                          f"as a whole. Give a new subfolder, e.g. {option} {Path(out) / 'out'}")
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputError(f"{option} {out} exists and is a file, not a folder; choose another {option}")
    listed = read_manifest(out, option)
    if listed is None:
        if any(out.iterdir()):
            raise OutputError(f"{option} {out} already exists and holds files moeca did not write (it has no "
                              f"{MANIFEST}); moeca only replaces folders it wrote. Choose another {option} or "
                              "move its contents away")
        return None
    foreign = _foreign(out, listed)
    if foreign:
        raise OutputError(f"{option} {out}: {', '.join(foreign[:5])} were not written by moeca but lie inside "
                          f"folders it wrote, so replacing them would delete them; move them out first or choose "
                          f"another {option}")
    return listed


def _install(tmp: Path, out: Path, listed: list[str] | None, option: str) -> None:
    if listed is None:                                   # absent or empty
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        (out / TMP_MARKER).unlink(missing_ok=True)
        return
    old_tops = {t for t in _top(listed) if (out / t).exists() or (out / t).is_symlink()}
    kept = [p.name for p in out.iterdir() if p.name not in old_tops and p.name != MANIFEST]
    new = [p.name for p in tmp.iterdir() if p.name not in (MANIFEST, TMP_MARKER)]
    kept = [name for name in kept if name != TMP_MARKER]     # a marker a killed install left is moeca's
    clash = sorted(set(new) & set(kept))
    if clash:
        raise OutputError(f"{option} {out}: {', '.join(clash)} already exist there and were not written by moeca; "
                          f"move them away or choose another {option}")
    trash = out.parent / f"{sibling_prefix(out.name, 'old', 10)}{os.getpid()}"
    if not kept:                                         # only moeca's files: swap the whole folder
        _mark_temporary(out)                             # so a kill right after the swap leaves a marked old copy
        os.replace(out, trash)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(trash, out)                       # put the previous output back
            (out / TMP_MARKER).unlink(missing_ok=True)
            raise
        (out / TMP_MARKER).unlink(missing_ok=True)
        shutil.rmtree(trash, ignore_errors=True)
        return
    trash.mkdir()                                        # the user's files stay where they are
    _mark_temporary(trash)
    moved: list[str] = []
    try:
        for name in sorted(old_tops):
            os.replace(out / name, trash / name)
            moved.append(name)
        for name in sorted(new) + [MANIFEST]:
            os.replace(tmp / name, out / name)
    except BaseException:
        for name in moved:                               # the previous output goes back where it was
            if not (out / name).exists():
                os.replace(trash / name, out / name)
        raise
    (out / TMP_MARKER).unlink(missing_ok=True)
    shutil.rmtree(trash, ignore_errors=True)
    (tmp / TMP_MARKER).unlink(missing_ok=True)
    tmp.rmdir()


@contextmanager
def output_dir(out: str | os.PathLike, what: str = "output folder", option: str = "--out",
               inputs: Sequence[tuple[str, str | os.PathLike | None]] = (), command: str = "") -> Iterator[Path]:
    """Build an output folder in a temporary sibling (yielded) and install it at ``out`` on success.

    Before anything is computed: ``out`` must not overlap ``inputs`` and must be absent, empty or a
    folder with a moeca manifest (whose listed files alone are replaced; other files stay). On
    failure the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    check_no_overlap(out, inputs, option)
    _check_replaceable(out, option)
    with os_errors(f"{what} {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out, option):
        with os_errors(f"{what} {out}"):
            remove_stale_temporaries(out)
            tmp = Path(tempfile.mkdtemp(prefix=sibling_prefix(out.name, "tmp", 8), dir=out.parent))
        with os_errors(f"{what} {out}", tmp):
            _mark_temporary(tmp)                         # kept until installed: a kill at the rename is cleanable
            yield tmp
            _finish(tmp, out, option, command)


def _finish(tmp: Path, out: Path, option: str, command: str) -> None:
    """Sync ``tmp``'s files, write its manifest and install it at ``out`` (the marker goes last)."""
    files = [f for f in _list_files(tmp) if f != TMP_MARKER]
    for f in files:
        if (tmp / f).is_file() and not (tmp / f).is_symlink():
            _fsync_file(tmp / f)
    _write_manifest(tmp, files, command)
    listed = _check_replaceable(out, option)             # again: the folder may have changed meanwhile
    _install(tmp, out, listed, option)
    _fsync_dir(out.parent)
