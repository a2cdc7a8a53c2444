"""Registry aliases across runs: ``best`` moves to a better newer model, never to a worse."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tasks.tracking import update_aliases


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    source = tmp_path / "model"
    source.mkdir()

    def add(mean: float, metric: str = "accuracy", dev: float | None = None) -> str:
        # The selection-split mean decides; the dev mean only reports (1 - mean by
        # default, so that a test would fail if the dev mean decided).
        dev = 1 - mean if dev is None else dev
        version = client.create_model_version(
            "m", source=str(source),
            tags={"glp.metric": metric, "glp.selection_mean": f"{mean:.6f}",
                  "glp.metric_mean": f"{dev:.6f}"})
        return str(version.version)

    return uri, client, add


def _alias(client, alias):
    return str(client.get_model_version_by_alias("m", alias).version)


def test_best_moves_only_to_a_better_model(registry):
    uri, client, add = registry
    first = add(0.80)
    assert update_aliases.fn(uri, "m", {"best": first, "depth-5": first}) == {
        "best": first, "depth-5": first}
    better = add(0.83)
    assert update_aliases.fn(uri, "m", {"best": better})["best"] == better
    assert _alias(client, "best") == better
    worse = add(0.79)
    placed = update_aliases.fn(uri, "m", {"best": worse, "depth-4": worse})
    assert placed == {"best": better, "depth-4": worse}  # a new alias is always set
    assert _alias(client, "best") == better and _alias(client, "depth-4") == worse
    tie = add(0.83)
    assert update_aliases.fn(uri, "m", {"best": tie})["best"] == better  # ties keep the old


def test_the_dev_mean_never_moves_best(registry):
    uri, client, add = registry
    first = add(0.80, dev=0.70)
    update_aliases.fn(uri, "m", {"best": first})
    # A far better dev mean with a worse selection mean: best stays.
    dev_winner = add(0.79, dev=0.99)
    assert update_aliases.fn(uri, "m", {"best": dev_winner})["best"] == first


def test_a_different_metric_is_not_comparable(registry):
    uri, client, add = registry
    first = add(0.90, metric="accuracy")
    update_aliases.fn(uri, "m", {"best": first})
    other = add(0.10, metric="mcc")
    assert update_aliases.fn(uri, "m", {"best": other})["best"] == other


def test_re_running_the_same_version_is_a_no_op(registry):
    uri, client, add = registry
    version = add(0.5)
    for _ in range(2):
        assert update_aliases.fn(uri, "m", {"best": version}) == {"best": version}


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    code = ("import sys, time; from tasks.tracking import client_for; "
            "time.sleep(float(sys.argv[2]) - time.time()); "
            "client_for(sys.argv[1]).search_experiments()")
    import time

    start = str(time.time() + 8)  # every process imports, then they all open at once
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, start],
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(errors)
