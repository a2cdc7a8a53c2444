"""A command checks its inputs before it pays for MLflow, SciPy and scikit-learn: the flows'
modules do not import them (flows/launch.py imports them while the Prefect server starts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFERRED = ("mlflow", "scipy.stats", "sklearn")


def test_flow_modules_defer_mlflow_scipy_and_sklearn() -> None:
    code = (
        "import sys, flows.cli, flows.prune, flows.compare, flows.compress; "
        f"bad = sorted(m for m in {DEFERRED!r} if m in sys.modules); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
