"""The library layer: glp never imports the orchestration (Prefect, MLflow, tasks, flows)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "glp"
FORBIDDEN = frozenset({"prefect", "mlflow", "tasks", "flows"})
MODULES = "glp, glp.data, glp.train, glp.search, glp.surgery, glp.models, glp.metrics, glp.config"


def imported_roots(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import anywhere in a module."""
    found = []
    for node in ast.walk(tree):  # walks into functions, classes and TYPE_CHECKING blocks
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_library_has_modules() -> None:
    names = {p.name for p in library_files()}
    assert {"__init__.py", "search.py", "train.py", "surgery.py"} <= names


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_orchestration_imports(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [f"line {line}: {root}" for line, root in imported_roots(tree) if root in FORBIDDEN]
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {', '.join(bad)}"


def test_the_checker_sees_nested_imports() -> None:
    source = (
        "import os\n"
        "def f():\n"
        "    import prefect.flows\n"
        "    from mlflow import log_metric\n"
        "class C:\n"
        "    def g(self):\n"
        "        from tasks.search import x\n"
        "from . import flows\n"  # relative: glp.flows, not the top-level package
    )
    roots = [root for _, root in imported_roots(ast.parse(source))]
    assert roots == ["os", "prefect", "mlflow", "tasks"]


def test_importing_the_library_loads_no_orchestration() -> None:
    code = (
        f"import {MODULES}; import sys; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')); "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
