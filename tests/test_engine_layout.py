"""Mechanism apart from policy: ``policy/`` never imports ``replay/`` (a caching method is a schedule,
or a hook the schedule names), and the engine is split by unit."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_policy_sources_never_import_replay():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.startswith("moeca.replay"))
                 for p in (ROOT / "policy").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}
    assert not (ROOT / "policy" / "baselines").exists()


def test_policy_methods_never_run_the_model():
    """Model-running fits live with the engine (replay/fit): no method unit imports torch or a runtime."""
    offenders = {p.name: sorted(n for n in _imports(p) if n == "torch" or n.startswith("moeca.models.runtime"))
                 for p in (ROOT / "policy" / "methods").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_every_policy_module_loads_no_replay_module():
    code = ("import importlib, pkgutil, sys\n"
            "import moeca.policy, moeca.policy.methods\n"
            "for pkg in (moeca.policy, moeca.policy.methods):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__):\n"
            "        importlib.import_module(pkg.__name__ + '.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n.startswith('moeca.replay')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_engine_is_split_by_unit():
    units = {p.stem for p in (ROOT / "replay" / "units").glob("*.py")}
    assert {"attention", "routed", "token", "model_skip", "selection", "dispatch"} <= units
    assert len((ROOT / "replay" / "runtime.py").read_text().splitlines()) < 300
