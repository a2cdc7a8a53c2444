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

    def add(mean: float, metric: str = "accuracy", dev: float | None = None,
            selection: str = "rows-a") -> str:
        # The selection-split mean decides; the dev mean only reports (1 - mean by
        # default, so that a test would fail if the dev mean decided).
        dev = 1 - mean if dev is None else dev
        version = client.create_model_version(
            "m", source=str(source),
            tags={"glp.metric": metric, "glp.selection_mean": f"{mean:.6f}",
                  "glp.metric_mean": f"{dev:.6f}", "glp.selection_fingerprint": selection})
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


def test_means_on_other_selection_rows_are_not_comparable(registry):
    # A run at another --train-limit (or training file, selection fraction, split seed)
    # scores on other selection rows: its mean says nothing against this one's, so the newer
    # registration wins, as for another metric; on the same rows the better mean wins.
    uri, client, add = registry
    full = add(0.90, selection="rows-a")
    update_aliases.fn(uri, "m", {"best": full})
    trial = add(0.70, selection="rows-b")
    assert update_aliases.fn(uri, "m", {"best": trial})["best"] == trial
    again = add(0.60, selection="rows-b")
    assert update_aliases.fn(uri, "m", {"best": again})["best"] == trial


def test_a_version_without_its_selection_rows_is_not_comparable(registry):
    uri, client, add = registry
    old = client.create_model_version(  # registered before versions named their rows
        "m", source=client.get_model_version("m", add(0.1)).source,
        tags={"glp.metric": "accuracy", "glp.selection_mean": "0.990000"})
    update_aliases.fn(uri, "m", {"best": str(old.version)})
    new = add(0.80)
    assert update_aliases.fn(uri, "m", {"best": new})["best"] == new


def test_re_running_the_same_version_is_a_no_op(registry):
    uri, client, add = registry
    version = add(0.5)
    for _ in range(2):
        assert update_aliases.fn(uri, "m", {"best": version}) == {"best": version}


@pytest.mark.slow  # four subprocesses
def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    code = ("import sys, time; from tasks.tracking import client_for; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
            "client_for(sys.argv[1]).search_experiments()")
    import time

    start = str(time.time() + 8)  # every process imports, then they all open at once
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, start],
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(errors)


def test_an_int8_alias_never_outlives_its_fp32_alias(registry, monkeypatch):
    """``best`` moves to a better model that has no int8 graph: ``best-int8`` is removed
    instead of naming the old model's graph."""
    import tasks.registry
    from tasks.registry import Registration, register_all
    from tasks.tracking import drop_aliases

    uri, client, add = registry
    monkeypatch.setattr(tasks.registry, "update_aliases", update_aliases.fn)
    monkeypatch.setattr(tasks.registry, "drop_aliases", drop_aliases.fn)
    means = iter([0.80, 0.80, 0.85])

    def register(registration, int8):
        return add(next(means))

    row = {"seed": 40, "selection_value": 0.80, "value": 0.7, "int8_value": 0.69}
    first = [Registration(5, "depth-5", row, [row])]
    assert register_all(uri, "m", first, register, [], lambda r: None) == {
        "depth-5": "1", "best": "1", "depth-5-int8": "2", "best-int8": "2"}
    better = {"seed": 40, "selection_value": 0.85, "value": 0.8, "int8_value": None}
    placed = register_all(uri, "m", [Registration(5, "depth-5", better, [better])], register,
                          [], lambda r: None)
    assert placed == {"depth-5": "3", "best": "3"}
    aliases = client.get_registered_model("m").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"depth-5": "3", "best": "3"}

