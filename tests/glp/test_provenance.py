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


def test_a_fine_tune_s_closure_holds_no_compression_method():
    """Editing a method (or the registry's other packages) recomputes no fine-tune."""
    closure = source_closure("tasks.training")
    assert not [m for m in closure if m.startswith("glp.methods")], sorted(closure)


@pytest.mark.parametrize("method", ["mlpruning", "grain", "lowrank", "autoencoder"])
def test_a_method_s_closure_holds_no_other_method(method):
    """A compression's key covers its own method and never another one, so editing
    autoencoder/compress.py recomputes no GRAIN model."""
    from glp.methods import compressors, get_method

    closure = source_closure("tasks.methods", get_method(method).module)
    assert get_method(method).module in closure
    for other in compressors():
        if other.name != method:
            assert not [m for m in closure if m.startswith(f"glp.methods.{other.name}")], (
                other.name, sorted(closure))


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
    # An unused function added to another method's module changes nothing here either.
    other = tmp_path / "glp" / "methods" / "autoencoder" / "compress.py"
    other.write_text(other.read_text() + "\n\ndef unused():\n    return 0\n")
    assert _fingerprint_in(tmp_path) == before
    train = tmp_path / "glp" / "training" / "train.py"
    train.write_text(train.read_text().replace("def total_steps(", "def total_steps(  ", 1))
    assert _fingerprint_in(tmp_path) != before
