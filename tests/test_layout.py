"""The house: the core (the modules at the top of ``src/bild``) never imports the tools built on it (``bild.bench``).

The tools (benchmark, calibration, alignment, the ``bild`` command) import the core, not the other way round, so
``import bild`` stays light and the core can be read, tested and reused without peft, datasets or metrics.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bild"
TOOLS = "bild.bench"
CORE = sorted(PACKAGE.glob("*.py"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``, anywhere in it (lazy imports included).

    Relative imports are resolved against the package ``bild``; ``from bild import bench`` counts as ``bild.bench``;
    string arguments of ``importlib.import_module`` are read too (relative ones against ``bild``).
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ("bild" + (f".{node.module}" if node.module else "")) if node.level else node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                name = node.args[0].value
                found.append((node.lineno, f"bild{name}" if name.startswith(".") else name))
    return found


def imports_tools(name: str) -> bool:
    return name == TOOLS or name.startswith(TOOLS + ".")


def test_the_core_is_found():
    """The check below reads the real core: guard against an empty glob after a move."""
    names = {path.stem for path in CORE}
    assert {"__init__", "config", "integration", "decoding", "cache", "stats"} <= names
    assert not {"calibration", "alignment"} & names, "the tools live in bild/bench/, not beside the core"


@pytest.mark.parametrize("path", CORE, ids=lambda path: path.name)
def test_core_modules_do_not_import_the_tools(path):
    offending = [f"{path.name}:{line}: {name}" for line, name in imported_modules(path) if imports_tools(name)]
    assert not offending, f"core modules must not import {TOOLS} (move the code into the tools): {offending}"


def test_the_import_check_sees_every_form(tmp_path):
    """The AST reader catches absolute, relative, from-package and importlib forms (else the test above is blind)."""
    path = tmp_path / "probe.py"
    path.write_text(
        "import bild.bench.cli\nfrom .bench import running\nfrom . import bench\nfrom bild import bench\n"
        "def f():\n    import importlib\n    importlib.import_module('.bench.calibration', 'bild')\n"
        "from . import config\nimport bild.benchmarks\n",
        encoding="utf-8",
    )
    hits = [line for line, name in imported_modules(path) if imports_tools(name)]
    assert sorted(set(hits)) == [1, 2, 3, 4, 7]


def test_import_bild_does_not_load_the_tools():
    """A fresh interpreter: ``import bild`` leaves ``bild.bench`` unloaded; a lazy name loads it on first use."""
    code = (
        "import sys, bild\n"
        "assert not [m for m in sys.modules if m == 'bild.bench' or m.startswith('bild.bench.')], "
        "sorted(m for m in sys.modules if m.startswith('bild'))\n"
        "assert bild.Budget.parse('chrf>=-1').threshold == -1\n"
        "assert 'bild.bench.calibration' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_every_exported_name_resolves():
    import bild

    for name in bild.__all__:
        assert getattr(bild, name) is not None, name


def core_import_graph() -> dict[str, set[str]]:
    """Which core modules each core module imports (``bild.x`` names, lazy imports included)."""
    names = {f"bild.{path.stem}" for path in CORE if path.stem != "__init__"}
    graph = {}
    for path in CORE:
        if path.stem == "__init__":
            continue
        imported = {name for _, name in imported_modules(path)}
        graph[f"bild.{path.stem}"] = {n for n in names if n in imported or any(i.startswith(n + ".") for i in imported)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (its first node repeated at the end), or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if cycle := visit(child):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node))), None)


def test_core_imports_only_run_downward():
    """No two core modules import each other, directly or round a circle (shared types live in state.py, machine
    measurement in timing.py); the check finds a circle where there is one."""
    graph = core_import_graph()
    assert {"bild.decoding", "bild.state", "bild.timing"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({**graph, "bild.state": graph["bild.state"] | {"bild.decoding"}}) is not None
