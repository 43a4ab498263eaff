"""Shared Streamlit helpers: the root, cached data access, and the "how to produce data" messages.

Pages call these; all file access goes through :mod:`moeca.app.paths` and the cached loaders here
(``st.cache_data`` keyed by root, root-relative path and a fingerprint of file sizes/mtimes, so a
rewritten trace or report is re-read and an unchanged one is not).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pandas as pd
import streamlit as st

from moeca.app import inventory as inv
from moeca.app import trace_data as td
from moeca.app import uploads
from moeca.app.paths import resolve_root, resolve_under
from moeca.app.schedule_view import parse_schedule_upload

ROOT_ENV = "MOECA_APP_ROOT"
"""Environment variable through which ``moeca app`` hands ``--root`` to the Streamlit script."""


def root() -> Path:
    """The resolved app root (``$MOECA_APP_ROOT``, else the working directory); stops the page if invalid."""
    raw = os.environ.get(ROOT_ENV) or os.getcwd()
    try:
        return resolve_root(raw)
    except (FileNotFoundError, NotADirectoryError) as exc:
        st.error(f"{exc}")
        st.stop()
        raise  # unreachable: st.stop() raises


def fingerprint(root_dir: Path, rels: tuple[str, ...]) -> tuple:
    """(path, size, mtime_ns) per root-relative path, so caches notice rewritten files."""
    out = []
    for rel in rels:
        try:
            stat = resolve_under(root_dir, rel).stat()
            out.append((rel, stat.st_size, stat.st_mtime_ns))
        except (OSError, ValueError):
            out.append((rel, -1, -1))
    return tuple(out)


@st.cache_data(ttl=15, show_spinner="Looking for traces, reports, schedules and results...")
def inventory(root_str: str) -> inv.Inventory:
    return inv.discover(Path(root_str))


@st.cache_data(ttl=15, show_spinner=False)
def trace_info(root_str: str, trace_rel: str) -> td.TraceInfo:
    return td.load_trace_info(Path(root_str), trace_rel)


def _info_key(root_dir: Path, info: td.TraceInfo) -> tuple:
    return fingerprint(root_dir, info.branch_files + info.token_files + (f"{info.rel}/run.json",))


@st.cache_data(max_entries=8, show_spinner="Aggregating expert-branch rows (DuckDB)...")
def branch_aggregate(root_str: str, info: td.TraceInfo, key: tuple) -> pd.DataFrame:
    return td.branch_aggregate(Path(root_str), info)


@st.cache_data(max_entries=8, show_spinner="Aggregating token rows (DuckDB)...")
def token_aggregate(root_str: str, info: td.TraceInfo, key: tuple) -> pd.DataFrame:
    return td.token_aggregate(Path(root_str), info)


@st.cache_data(max_entries=16, show_spinner="Binning per-expert drift (DuckDB)...")
def branch_histogram(root_str: str, info: td.TraceInfo, lag: int, key: tuple) -> pd.DataFrame:
    return td.branch_histogram(Path(root_str), info, lag)


def trace_frames(root_dir: Path, info: td.TraceInfo) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(branch aggregate, token aggregate) of a trace, cached by file fingerprint."""
    key = _info_key(root_dir, info)
    return branch_aggregate(str(root_dir), info, key), token_aggregate(str(root_dir), info, key)


def trace_histogram(root_dir: Path, info: td.TraceInfo, lag: int) -> pd.DataFrame:
    return branch_histogram(str(root_dir), info, lag, _info_key(root_dir, info))


@st.cache_data(max_entries=16, show_spinner=False)
def _schedule_file(root_str: str, rel: str, key: tuple):
    return parse_schedule_upload(resolve_under(Path(root_str), rel).read_bytes(), rel)


def schedule_file(root_dir: Path, rel: str):
    """The validated :class:`~moeca.policy.schedule.Schedule` in a file under the root (cached by size and
    mtime); raises ``moeca.app.uploads.UploadError`` naming the bad field."""
    return _schedule_file(str(root_dir), rel, fingerprint(root_dir, (rel,)))


def show_unreadable(found: inv.Inventory) -> None:
    """One warning line per JSON file under the root that discovery could not parse (the rest of the page works
    without it); root-relative names only."""
    if found.unreadable:
        st.warning(f"{len(found.unreadable)} JSON file(s) under the root could not be read and are skipped:\n\n"
                   + "\n".join(f"- {reason}" for _rel, reason in found.unreadable))


def q(path: Path | str) -> str:
    return shlex.quote(str(path))


def produce_commands(root_dir: Path) -> dict[str, str]:
    """The exact shell commands that create each kind of data under ``root_dir``."""
    out = root_dir / "out"
    return {
        "everything": f"moeca run --out {q(out)}",
        "trace": f"moeca trace --model demo --out {q(out / 'trace')}",
        "report": f"moeca analyze {q(out / 'trace')} --out {q(out / 'report')}",
        "schedule": (f"moeca schedule derive {q(out / 'trace')} --target-speedup 1.5 "
                     f"--out {q(out / 'schedule.json')}"),
        "replay": (f"moeca replay --schedule {q(out / 'schedule.json')} --model demo "
                   f"--out {q(out / 'replay')}"),
        "pareto": f"moeca bench pareto --model demo --out {q(root_dir / 'bench' / 'results')}",
        "app": f"moeca app --root {q(root_dir)}",
    }


def show_how_to_produce(root_dir: Path, what: str, needs: tuple[str, ...]) -> None:
    """An info box saying nothing of kind ``what`` was found under the root and the commands to make it."""
    cmds = produce_commands(root_dir)
    st.info(f"No {what} found under `{root_dir}`. Produce it with the commands below "
            "(then this page picks it up within 15 seconds, or press R to rerun).")
    lines = [cmds[n] for n in needs]
    st.code("\n".join(lines), language="bash")
    st.caption("Or run the whole chain (trace, analyze, derive, replay) at once: "
               f"`{cmds['everything']}`")


def pick(label: str, options: tuple[str, ...], key: str, help: str | None = None) -> str:
    """A selectbox over root-relative paths (first = default)."""
    return st.selectbox(label, options, key=key, help=help)


def table_upload(label: str, key: str) -> None:
    """A JSON/Parquet upload shown as a table; a bad file shows why it was rejected (never unpickled)."""
    up = st.file_uploader(label, type=["json", "parquet"], key=key)
    if up is None:
        return
    try:
        table = uploads.parse_table(up.getvalue(), up.name)
    except uploads.UploadError as exc:
        st.error(f"Upload rejected: {exc}")
    else:
        st.success(f"{up.name}: {len(table)} rows, {len(table.columns)} columns")
        st.dataframe(table, hide_index=True)
