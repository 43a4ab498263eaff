"""The import graph follows the data flow of DESIGN.md section 2, for every import in every module (at
module level or inside a function): a folder imports only the folders before it, so there is no cycle
between folders and nothing but ``bench`` imports ``app`` and nothing imports ``bench``. Imports sit at
module level, so a module's first lines show what it depends on; one inside a function says why in a
comment (a heavy dependency of a module that ``moeca`` loads at start-up, an optional extra, a POSIX-only
module)."""
from __future__ import annotations

import ast
import subprocess
import sys
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


def _function_imports_without_reason(path: Path) -> list[str]:
    """``file:line`` of each import inside a function with no comment saying why: on its line, or on a line
    between the previous statement of its block (or the block's header) and it; an import that follows
    another import in the same block shares that one's reason."""
    lines = path.read_text().splitlines()
    missing = []

    def commented(first: int, last: int) -> bool:   # 1-based, inclusive
        return any("#" in lines[i - 1] for i in range(max(first, 1), last + 1))

    def visit(body: list[ast.stmt], header_end: int, in_function: bool) -> None:
        previous: ast.stmt | None = None
        reason = False
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and in_function:
                start = previous.end_lineno + 1 if previous is not None else header_end + 1
                mine = commented(start, node.end_lineno)
                chained = isinstance(previous, (ast.Import, ast.ImportFrom)) and reason
                reason = mine or chained
                if not reason:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            else:
                reason = False
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    before = {"body": [], "orelse": node.body, "finalbody": [*node.body, *getattr(node, "handlers", []),
                                                                             *getattr(node, "orelse", [])]}[field]
                    header = max((n.end_lineno for n in before), default=node.lineno)
                    visit(inner, header, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
            for handler in getattr(node, "handlers", []):
                visit(handler.body, handler.lineno, in_function)
            previous = node

    visit(ast.parse("\n".join(lines), str(path)).body, 0, False)
    return missing


def test_imports_inside_functions_say_why():
    missing = [where for folder in ALLOWED for path in sorted((ROOT / folder).rglob("*.py"))
               for where in _function_imports_without_reason(path)]
    assert not missing, ("imports inside functions with no comment saying why (move them to module level, or "
                         f"say which heavy or optional dependency they defer): {missing}")


def test_the_cli_starts_without_the_heavy_libraries():
    """``moeca --help`` registers every command without importing torch, pandas, matplotlib or streamlit:
    that is the reason the command modules give for their deferred imports."""
    code = ("import sys\nfrom moeca.cli.main import build_parser\nbuild_parser()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pandas', 'pyarrow', 'matplotlib', "
            "'streamlit', 'duckdb', 'diffusers', 'seaborn', 'scipy', 'sklearn'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
