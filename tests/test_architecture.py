"""The code's shape: what may import what, and what importing costs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "tasks", "workers", "retrieval", "ops")
#: entry modules: importing them reads the environment (that is their job)
ENTRY_MODULES = {"tasks.app", "api.wsgi", "ops.gunicorn.conf", "ops.cluster"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports at module level or inside functions (both count: a cycle
    through a function-level import still couples the two modules)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            # a package's __init__ importing its own submodules is not a cycle worth reporting
            if state.get(nxt) == 1 and not nxt.startswith(node + "."):
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_tasks_and_workers_never_import_the_api():
    upward = {(m, i) for m, deps in graph().items() for i in deps
              if m.split(".")[0] in ("tasks", "workers", "retrieval") and i.split(".")[0] == "api"}
    assert not upward


def test_importing_the_packages_loads_no_model_and_opens_no_connection():
    names = sorted(n for n in modules() if n not in ENTRY_MODULES and not n.startswith("ops.gunicorn"))
    code = (
        "import socket, sys\n"
        "opened = []\n"
        "real = socket.socket.connect\n"
        "socket.socket.connect = lambda self, addr: opened.append(addr) or real(self, addr)\n"
        f"for name in {names!r}: __import__(name)\n"
        "from api import create_app\n"
        "heavy = [m for m in ('vllm', 'torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
        "print(heavy, opened)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[] []"


def _is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) in ("pytest.fixture", "fixture")


def test_conftest_files_hold_fixtures_only_and_no_test_imports_one():
    """Helpers live in plain modules (tests/support.py, tests/<package>/support.py), importable as such;
    a conftest is pytest's to load, never another module's to import."""
    misplaced, importers = [], []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if path.name == "conftest.py":
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        any(map(_is_fixture, node.decorator_list)) or node.name.startswith("pytest_")):
                    continue  # fixtures and pytest hooks
                if isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr)):  # imports, docstring, setup calls
                    continue
                misplaced.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n.split(".")[-1] == "conftest" for n in names):
                importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not misplaced, f"not fixtures, in conftest files: {misplaced}"
    assert not importers, f"imports of a conftest: {importers}"
