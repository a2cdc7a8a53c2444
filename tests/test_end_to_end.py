"""End to end through the CLI on the real embedded MiniLM, with a tiny budget."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

pytestmark = pytest.mark.e2e

ARGS = ["prune", "--task", "SST-2", "--remove", "1", "--train-limit", "120", "--eval-limit",
        "60", "--epochs", "1", "--max-length", "32", "--seeds", "1", "--lr", "1e-4"]


def _glp(home, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e")
    first = _glp(home, *ARGS)
    assert first.returncode == 0, first.stdout + first.stderr
    second = _glp(home, *ARGS)
    assert second.returncode == 0, second.stdout + second.stderr
    return home, first.stdout, second.stdout


def test_tables_and_summary(runs):
    home, first, _ = runs
    candidates = ds.dataset(home / "parquet" / "candidates").to_table().to_pylist()
    selections = ds.dataset(home / "parquet" / "selections").to_table().to_pylist()
    finals = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    assert sorted(r["layer"] for r in candidates) == [0, 1, 2, 3, 4, 5]
    assert len(selections) == 1 and sorted(r["depth"] for r in finals) == [5, 6]
    assert "Pruning order" in first and "8 computed, 0 reused" in first
    assert "glp ui --home" in first and str(home / "parquet") in first
    # Only the final models keep weights, and none of them asks to run custom code.
    weights = sorted(p.parent.parent.name for p in home.glob("artifacts/*/*/model.safetensors"))
    assert weights == ["finals", "finals"]
    for config in home.glob("artifacts/finals/*/config.json"):
        assert "auto_map" not in config.read_text()
    assert {r["device"] for r in candidates + finals} == {"cpu"}


def test_rerun_reuses_everything(runs):
    home, _, second = runs
    assert "0 computed, 8 reused" in second
    assert len(ds.dataset(home / "parquet" / "candidates").to_table()) == 6


def test_registered_model_loads_and_predicts(runs):
    """The README's three lines, in a fresh interpreter (no registry URI set by the flow)."""
    import os
    import subprocess
    import sys

    home, _, _ = runs
    code = (
        f"import mlflow; mlflow.set_tracking_uri('sqlite:///{home / 'mlflow.db'}')\n"
        "pipe = mlflow.transformers.load_model("
        "'models:/glp-all-minilm-l6-v2-sst2-greedy@best')\n"
        "print(pipe('a warm, funny and moving film')[0]['label'], "
        "pipe.model.config.num_hidden_layers)\n"
    )
    # A user's fresh shell: no URI that an in-process flow of this test session has set.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    done = subprocess.run([sys.executable, "-c", code], cwd=home, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    label, layers = done.stdout.split()[-2:]
    assert label in {"0", "1"} and layers == "5"
