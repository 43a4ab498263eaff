"""The import graph follows the data flow of DESIGN.md section 2, for every import in every module (at
module level or inside a function): a folder imports only the folders before it, so there is no cycle
between folders and nothing but ``bench`` imports ``app`` and nothing imports ``bench``."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# folder -> the folders it may import (besides itself). ``cli`` registers the bench and app commands by
# module name (cli/main.py's list of strings), never by an import statement.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "data": set(),
    "models": {"common", "data"},
    "diffusion": {"common", "data", "models"},
    "evaluation": {"common", "data", "models", "diffusion"},
    "tracer": {"common", "models", "diffusion"},
    "analysis": {"common", "models", "diffusion", "tracer"},
    "policy": {"common", "models", "diffusion", "tracer", "analysis"},
    "replay": {"common", "data", "models", "diffusion", "evaluation", "policy"},
    "integrations": {"common", "models", "diffusion", "evaluation", "tracer", "analysis", "policy", "replay"},
    "cli": {"common", "data", "models", "diffusion", "evaluation", "tracer", "analysis", "policy", "replay",
            "integrations"},
    "testing": {"common", "data", "models", "diffusion", "tracer", "analysis", "policy", "replay"},
    "app": {"common", "data", "models", "diffusion", "evaluation", "tracer", "analysis", "policy", "replay",
            "integrations"},
    "bench": {"common", "data", "models", "diffusion", "evaluation", "tracer", "analysis", "policy", "replay",
              "integrations", "testing", "app", "cli"},
}


def _moeca_imports(path: Path) -> set[str]:
    """The moeca folders ``path`` imports, by absolute name (relative imports stay in their folder)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found.update(n.split(".")[1] for n in names if n.startswith("moeca.") and n.count(".") >= 1)
    return found


def test_every_code_folder_is_in_the_dependency_order():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert folders <= set(ALLOWED), f"add the new folder to ALLOWED (and DESIGN.md section 2): {folders - set(ALLOWED)}"


def test_imports_follow_the_dependency_order():
    offenders = {}
    for folder, allowed in ALLOWED.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = _moeca_imports(path) - allowed - {folder}
            if bad:
                offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"imports against the data flow (DESIGN.md section 2): {offenders}"


def test_the_order_has_no_cycle():
    seen: dict[str, int] = {}

    def visit(folder: str, stack: tuple[str, ...]) -> None:
        assert folder not in stack, f"cycle: {' -> '.join(stack + (folder,))}"
        for dep in ALLOWED.get(folder, ()):
            visit(dep, stack + (folder,))
        seen[folder] = 1

    for folder in ALLOWED:
        visit(folder, ())
