"""The prune flow on a tiny model: tables, MLflow runs and registry, and the cache."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
from mlflow.tracking import MlflowClient

from flows.prune import PruneParams, prune


def _params(model, home, **overrides) -> PruneParams:
    values = dict(model=str(model), task="sst2", remove=2, train_limit=80, eval_limit=40,
                  epochs=1.0, max_length=16, learning_rate=1e-3, batch_size=16, seeds=1,
                  home=str(home))
    return PruneParams(**{**values, **overrides})


def _rows(home, table):
    return ds.dataset(home / "parquet" / table).to_table().to_pylist()


@pytest.fixture(scope="module")
def two_runs(harness, tiny_bert, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    first = prune(_params(tiny_bert, home))
    second = prune(_params(tiny_bert, home))
    return home, first, second


def test_greedy_search_shape_and_tables(two_runs):
    home, first, _ = two_runs
    assert len(first.order) == 2 and len(set(first.order)) == 2
    candidates = _rows(home, "candidates")
    # 3 candidates, then 2: every remaining layer is tried in each iteration.
    assert sorted(r["iteration"] for r in candidates) == [0, 0, 0, 1, 1]
    second_iteration = [r for r in candidates if r["iteration"] == 1]
    assert all(first.order[0] in r["removed"] for r in second_iteration)
    selections = sorted(_rows(home, "selections"), key=lambda r: r["iteration"])
    assert [r["layer"] for r in selections] == first.order
    # The chosen layer has the best score of its iteration (ties: highest index).
    for selection in selections:
        rows = [r for r in candidates if r["iteration"] == selection["iteration"]]
        best = max(rows, key=lambda r: (r["value"], r["layer"]))
        assert best["layer"] == selection["layer"]
    finals = _rows(home, "finals")
    assert sorted(r["depth"] for r in finals) == [1, 2, 3]
    assert all(r["metric"] == "accuracy" and 0 <= r["value"] <= 1 for r in finals)
    assert all(r["cache_key"] and r["job_id"] == first.job_id for r in candidates + finals)
    params = {r["depth"]: r["parameters"] for r in finals}
    assert params[3] > params[2] > params[1]


def test_second_run_is_served_from_cache_without_duplicates(two_runs):
    home, first, second = two_runs
    assert first.computed == 8 and first.reused == 0  # 3 + 2 candidates, 3 finals
    assert second.computed == 0 and second.reused == 8
    assert second.order == first.order and second.job_id == first.job_id
    assert [c["value"] for c in second.candidates] == [c["value"] for c in first.candidates]
    assert len(_rows(home, "candidates")) == 5
    assert len(_rows(home, "selections")) == 2
    assert len(_rows(home, "finals")) == 3


def test_mlflow_runs_and_registry(two_runs):
    home, first, second = two_runs
    client = MlflowClient(tracking_uri=first.tracking_uri, registry_uri=first.tracking_uri)
    parent = client.get_run(first.parent_run_id)
    assert second.parent_run_id == first.parent_run_id  # the same job reopens its run
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["fine_tunes_reused"] == 8
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'",
    )
    kinds = sorted(run.data.tags["glp.kind"] for run in children)
    assert kinds == ["candidate"] * 5 + ["final"] * 3  # no copies from the second run
    name = first.registered_model
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # depths 2 and 1, once each
    best = client.get_model_version_by_alias(name, "best")
    assert best.tags["glp.task"] == "sst2" and best.tags["glp.strategy"] == "greedy"
    assert best.tags["glp.removed_layers"]
    for tag in ("glp.model", "glp.metric", "glp.data_fingerprint", "glp.version",
                "glp.base_model_fingerprint", "glp.order", "glp.metric_mean"):
        assert best.tags[tag], tag
    depth_1 = client.get_model_version_by_alias(name, "depth-1")
    assert depth_1.tags["glp.removed_layers"] == ",".join(map(str, sorted(first.order)))


def test_changed_config_does_not_reuse(harness, tiny_bert, two_runs):
    home, first, _ = two_runs
    third = prune(_params(tiny_bert, home, remove=1, search_seed=7, register_models=False))
    assert third.job_id != first.job_id
    # A new search seed: 3 new candidate fine-tunes. The unpruned final model does not
    # depend on the search, so it is reused.
    assert third.computed >= 3
    assert third.reused >= 1
