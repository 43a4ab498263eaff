"""The explorer's path guard: only files under --root are read."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeca.app.paths import PathOutsideRoot, check_relative, resolve_root, resolve_under, walk


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "b" / "ok.json").write_text("{}")
    (outside / "secret.txt").write_text("secret")
    (root / "link_out").symlink_to(outside)                       # folder link leaving the root
    (root / "file_out.txt").symlink_to(outside / "secret.txt")    # file link leaving the root
    (root / "link_in").symlink_to(root / "a")                     # folder link staying inside
    (root / "a" / "loop").symlink_to(root / "a")                  # a cycle inside the root
    return resolve_root(root), outside


def test_resolve_inside(tree):
    root, _ = tree
    assert resolve_under(root, "a/b/ok.json") == root / "a" / "b" / "ok.json"
    assert resolve_under(root, "link_in/b/ok.json") == root / "a" / "b" / "ok.json"
    assert resolve_under(root, ".") == root
    assert resolve_under(root, "a\\b\\ok.json") == root / "a" / "b" / "ok.json"


@pytest.mark.parametrize("bad", ["../outside/secret.txt", "a/../../outside/secret.txt", "..", "a/b/../../.."])
def test_dotdot_refused(tree, bad):
    root, _ = tree
    with pytest.raises(PathOutsideRoot, match=r"'\.\.'"):
        resolve_under(root, bad)


@pytest.mark.parametrize("bad", ["/etc/passwd", "\\etc\\passwd", "C:\\Windows", "~/secret", "~root/x"])
def test_absolute_refused(tree, bad):
    root, _ = tree
    with pytest.raises(PathOutsideRoot, match="absolute"):
        resolve_under(root, bad)


def test_absolute_path_into_root_still_refused(tree):
    root, _ = tree
    with pytest.raises(PathOutsideRoot):
        resolve_under(root, str(root / "a" / "b" / "ok.json"))


def test_symlinks_leaving_root_refused(tree):
    root, outside = tree
    with pytest.raises(PathOutsideRoot, match="outside the app root"):
        resolve_under(root, "link_out/secret.txt")
    with pytest.raises(PathOutsideRoot, match="outside the app root"):
        resolve_under(root, "file_out.txt")
    assert (outside / "secret.txt").read_text() == "secret"  # the target exists: refusal is the guard's doing


def test_nul_and_missing(tree):
    root, _ = tree
    with pytest.raises(PathOutsideRoot, match="NUL"):
        check_relative("a\x00b")
    with pytest.raises(FileNotFoundError, match="not found under the app root"):
        resolve_under(root, "a/missing.json")
    assert resolve_under(root, "a/missing.json", must_exist=False) == root / "a" / "missing.json"


def test_root_must_be_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_root(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        resolve_root(tmp_path / "f")


def test_walk_never_leaves_root(tree):
    root, outside = tree
    seen_files = []
    seen_dirs = []
    for current, dirs, files in walk(root):
        seen_dirs.append(current)
        seen_files += [current / f for f in files]
        assert current.resolve().is_relative_to(root)
    names = {p.name for p in seen_files}
    assert "ok.json" in names
    assert "secret.txt" not in names and "file_out.txt" not in names
    assert not any(d.resolve().is_relative_to(outside) for d in seen_dirs)
    # the cycle (a/loop -> a) and the inner link (link_in -> a) are visited once, not forever
    assert sum(1 for d in seen_dirs if d.resolve() == root / "a") == 1


def test_walk_skips_hidden_and_caches(tmp_path):
    root = resolve_root(tmp_path)
    (root / ".git").mkdir()
    (root / ".git" / "x.json").write_text("{}")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "y.json").write_text("{}")
    (root / "keep").mkdir()
    (root / "keep" / "z.json").write_text("{}")
    files = [f for _, _, fs in walk(root) for f in fs]
    assert files == ["z.json"]


def test_walk_depth_limit(tmp_path):
    root = resolve_root(tmp_path)
    deep = root.joinpath(*"abcdefg")
    deep.mkdir(parents=True)
    (deep / "deep.json").write_text("{}")
    assert not [f for _, _, fs in walk(root, max_depth=3) for f in fs]
    assert [f for _, _, fs in walk(root, max_depth=7) for f in fs] == ["deep.json"]
    assert os.path.exists(deep / "deep.json")
