"""The library layer: glp never imports the orchestration (Prefect, MLflow, tasks, flows)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "glp"
FORBIDDEN = frozenset({"prefect", "mlflow", "tasks", "flows"})
MODULES = ("glp, glp.training.data, glp.training.train, glp.methods.layers.search, "
           "glp.core.surgery, glp.core.models, glp.training.metrics, glp.training.config")


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


def violations(path: Path) -> list[str]:
    """The forbidden imports of one module, as "line N: package"."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"line {line}: {root}" for line, root in imported_roots(tree) if root in FORBIDDEN]


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_orchestration_imports(path: Path) -> None:
    bad = violations(path)
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {', '.join(bad)}"


def test_the_check_flags_a_module_that_imports_orchestration(tmp_path: Path) -> None:
    module = tmp_path / "leaky.py"
    module.write_text(
        "import numpy\n"
        "import prefect\n"
        "from mlflow.tracking import MlflowClient\n"
        "if False:\n"
        "    import tasks.records\n"
        "def run():\n"
        "    from flows.prune import prune\n"
        "from .tasks import helper\n"  # relative: a glp submodule, not the tasks package
        "import prefectlike, glp.training.train\n",  # only the exact top-level names are forbidden
        encoding="utf-8",
    )
    assert violations(module) == [
        "line 2: prefect",
        "line 3: mlflow",
        "line 5: tasks",
        "line 7: flows",
    ]
    clean = tmp_path / "clean.py"
    clean.write_text("import numpy\nfrom glp.training.train import fine_tune\n", encoding="utf-8")
    assert violations(clean) == []


def test_every_imported_library_module_is_scanned() -> None:
    # The subprocess check below imports MODULES; each of them is also a scanned file (a
    # wrong PACKAGE path would otherwise leave the parametrised check with nothing to run).
    scanned = {".".join(("glp", *p.relative_to(PACKAGE).with_suffix("").parts))
               for p in library_files()}
    scanned = {name.removesuffix(".__init__") for name in scanned}
    assert set(MODULES.split(", ")) <= scanned


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
