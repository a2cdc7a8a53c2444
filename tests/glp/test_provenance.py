"""The code fingerprint in every cache key: it sees an edit of any module a fine-tune runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glp.core.provenance import code_fingerprint, source_closure

REPO = Path(__file__).resolve().parent.parent.parent
VERSIONS = {"torch": "2.13.0", "transformers": "5.24.0"}


def test_the_closure_of_a_fine_tune_holds_what_it_runs():
    closure = source_closure("tasks.training")
    for module in ("glp", "glp.training.train", "glp.core.surgery", "glp.core.models",
                   "glp.training.data", "glp.training.config",
                   "glp.training.metrics", "tasks.training", "tasks.progress", "tasks.data"):
        assert module in closure, module
    # Modules no fine-tune runs are not in it: editing them invalidates nothing.
    for module in ("glp.report.tables", "glp.deploy.bench", "flows.job", "flows.cli",
                   "tasks.tracking"):
        assert module not in closure, module
    assert all(path.is_file() and path.suffix == ".py" for path in closure.values())


def test_the_versions_of_torch_and_transformers_are_in_it():
    one = code_fingerprint("tasks.training", versions=VERSIONS)
    other = code_fingerprint("tasks.training", versions={**VERSIONS, "torch": "2.14.0"})
    assert one != other and len(one) == 16
    assert code_fingerprint("tasks.training", versions=VERSIONS) == one  # stable


def _fingerprint_in(root: Path) -> str:
    code = ("from glp.core.provenance import code_fingerprint; "
            f"print(code_fingerprint('tasks.training', versions={VERSIONS!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slow  # four subprocesses on a copy of the source
def test_editing_a_library_function_changes_the_fingerprint(tmp_path):
    """A real edit of a copy of the source: glp/training/train.py (imported by tasks.training
    through no direct line of the task's own body) changes it; glp/report/tables.py does not."""
    for package in ("glp", "tasks", "flows"):
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    before = _fingerprint_in(tmp_path)
    report = tmp_path / "glp" / "report" / "tables.py"
    report.write_text(report.read_text() + "\n# not run by a fine-tune\n")
    assert _fingerprint_in(tmp_path) == before
    train = tmp_path / "glp" / "training" / "train.py"
    train.write_text(train.read_text().replace("def total_steps(", "def total_steps(  ", 1))
    assert _fingerprint_in(tmp_path) != before
