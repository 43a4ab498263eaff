"""The README is a landing page and the docs hold the rest: links resolve, results pages are what
``moeca bench report`` generates from ``bench/results/``, and the README carries no run history."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from moeca.bench.report import MARKER, write_report
from moeca.common.outputs import OutputError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.is_file():
            continue
        seen.add(page)
        todo += [(page.parent / t.partition("#")[0]).resolve() for t in LINK.findall(page.read_text())
                 if not re.match(r"^[a-z]+://", t) and t.partition("#")[0]]
    orphans = [str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md") if p.resolve() not in seen]
    assert not orphans, f"docs pages no link leads to: {orphans}"


def test_readme_is_a_landing_page():
    text = README.read_text()
    assert len(text) <= 10_000, f"README.md has {len(text)} characters; move details to docs/"
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    assert not hashes, f"README.md names commits or hashes (run history belongs in git): {hashes}"
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(commands) == 2 and "moeca run" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].split("#")[0].strip() in ci, ".ci/run must call the README's test command"


def test_results_pages_are_what_bench_report_generates(tmp_path):
    """Rerunning a benchmark without ``moeca bench report`` leaves the docs stale: this catches it."""
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "bench" / "results")   # same relative links
    write_report(tmp_path / "bench" / "results", tmp_path / "docs" / "results")
    generated = {p.name: p.read_text() for p in (tmp_path / "docs" / "results").glob("*.md")}
    committed = {p.name: p.read_text() for p in (DOCS / "results").glob("*.md")}
    assert generated.keys() == committed.keys(), "run `moeca bench report` after a benchmark"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"docs/results pages out of date (run `moeca bench report`): {stale}"


def test_bench_report_refuses_a_page_it_did_not_write_and_removes_only_its_own(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "x.json").write_text('{"name": "x", "command": "moeca bench x", "environment": {"date": "d"}, '
                                    '"rows": [{"a": 1}]}')
    (results / "x.md").write_text("# X bench\n\nRegenerate: `moeca bench x`\n\n| a |\n|---|\n| 1 |\n\n![x](x.png)\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "x.md").write_text("my own notes\n")
    with pytest.raises(OutputError, match=r"x\.md exists and was not written by moeca bench report"):
        write_report(results, docs)
    assert (docs / "x.md").read_text() == "my own notes\n" and not (docs / "README.md").exists()
    (docs / "x.md").unlink()
    (docs / "mine.md").write_text("keep me\n")
    write_report(results, docs)
    page = (docs / "x.md").read_text()
    assert page.startswith(MARKER) and "Regenerate: `moeca bench x`" in page and "(../bench/results/x.png)" in page
    (docs / "old.md").write_text(MARKER + "\n# gone bench\n")
    write_report(results, docs)
    assert not (docs / "old.md").exists() and (docs / "mine.md").read_text() == "keep me\n"
