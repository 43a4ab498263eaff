"""Parsing JSON that a user (or anything else) may have written: bounded nesting, no duplicate keys.

Python's parser accepts a repeated key silently (the last one wins) and recurses once per nesting level, so
a 27 KB file of 10,000 ``[`` ends in a ``RecursionError``. :func:`parse_json` refuses both with one line that
names the file (the parser's own recursion limit is caught, and the nesting of what it returns is measured
without recursion).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

MAX_DEPTH = 64
"""Deepest nesting moeca accepts in a JSON file; its own files (schedules, run.json, reports) use fewer than 10."""



class JSONInputError(ValueError):
    """A JSON file (or text) that moeca refuses; the message names it, the problem and the fix."""


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def nesting_depth(doc: object) -> int:
    """How many lists/objects deep ``doc`` (a parsed JSON value) nests; a scalar is 0. No recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON (write a number or null)")


def parse_json(text: str | bytes, where: str, fix: str = "fix or regenerate the file", *,
               max_depth: int = MAX_DEPTH, constants: bool = True) -> object:
    """Parse ``text``; :class:`JSONInputError` ``"WHERE: PROBLEM; FIX"`` for invalid JSON, invalid UTF-8, a
    key repeated in one object (named), nesting deeper than ``max_depth``, or (``constants=False``) ``NaN``
    and ``Infinity``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"{where}: not UTF-8 text (byte {exc.start}); {fix}") from None
    deep = (f"{where}: JSON nested more than {max_depth} levels deep; moeca reads at most {max_depth} levels (its "
            f"own files use fewer than 10), so this is not a file moeca wrote; {fix}")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates,
                         **({} if constants else {"parse_constant": _no_constants}))
    except _DuplicateKey as dup:
        raise JSONInputError(f"{where}: key {dup.key!r} appears twice in one JSON object (which one counts would "
                             f"be a guess); keep one of them; {fix}") from None
    except RecursionError:
        raise JSONInputError(deep) from None
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"{where}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
                             f"{fix}") from None
    except ValueError as exc:
        raise JSONInputError(f"{where}: not valid JSON ({exc}); {fix}") from None
    if nesting_depth(doc) > max_depth:
        raise JSONInputError(deep)
    return doc


def read_json(path: str | os.PathLike, what: str = "JSON file", fix: str = "fix or regenerate the file", *,
              max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> object:
    """:func:`parse_json` of the file ``path`` (``where`` = ``WHAT PATH``); a file over ``max_bytes`` is refused
    unread. OS errors propagate (the callers name them)."""
    path = Path(path)
    where = f"{what} {path}"
    if max_bytes is not None:
        size = path.stat().st_size
        if size > max_bytes:
            raise JSONInputError(f"{where}: {size:,} bytes, more than the {max_bytes:,} moeca reads for such a "
                                 f"file; {fix}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise JSONInputError(f"{where}: not UTF-8 text (byte {exc.start}); {fix}") from None
    return parse_json(text, where, fix, max_depth=max_depth)
