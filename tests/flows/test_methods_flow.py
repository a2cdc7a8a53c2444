"""``compare --methods`` on a tiny model: every method's rows, one teacher, deployed
latency for every plan, the cross-method report and its plots, and the cache."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest

from flows.compare import CompareParams, compare

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests

METHODS = "greedy,top,mlpruning,lowrank,greedy+lowrank,greedy+mlpruning+lowrank"


def _params(model, home, **overrides) -> CompareParams:
    values = dict(model=str(model), task="sst2", remove=1, train_limit=80, eval_limit=40,
                  epochs=1.0, max_length=16, learning_rate=1e-3, batch_size=16, seeds=2,
                  methods=METHODS, densities=(0.6,), ratios=(2.0,), home=str(home))
    return CompareParams(**{**values, **overrides})


@pytest.fixture(scope="module")
def compared(harness, tiny_bert, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    first = compare(_params(tiny_bert, home))
    second = compare(_params(tiny_bert, home))
    return home, first, second


def _finals(home: Path) -> list[dict]:
    return ds.dataset(home / "parquet" / "finals").to_table().to_pylist()


def test_every_method_has_rows_with_its_plan(compared):
    home, first, _ = compared
    rows = _finals(home)
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert set(by_method) == {"unpruned", "layers", "mlpruning", "lowrank", "greedy+lowrank",
                              "greedy+mlpruning+lowrank"}
    assert len(by_method["mlpruning"]) == 2  # density 0.6, 2 seeds
    assert len(by_method["lowrank"]) == 1  # SVD is deterministic: one seed
    greedy = [r for r in by_method["layers"] if r["strategy"] == "greedy"]
    composed = by_method["greedy+lowrank"][0]
    # Layers, then ranks, in one plan: greedy's 2-layer model, factorised.
    assert composed["depth"] == 2 and composed["removed"] == greedy[0]["removed"]
    assert composed["target_ratio"] == 2.0
    assert composed["parameters"] < greedy[0]["parameters"]
    triple = by_method["greedy+mlpruning+lowrank"][0]
    assert triple["depth"] == 2 and triple["parameters"] < composed["parameters"]


def test_every_row_has_its_whole_training_and_the_unpruned_model_trains_as_long(compared):
    """Training is reported teacher included, and the comparison has the unpruned model
    fine-tuned for as long as the longest-trained method (MLPruning: the 1-epoch teacher,
    then its pruning and fine-tuning epochs)."""
    home, first, _ = compared
    rows = _finals(home)
    reference = [r for r in rows if r["strategy"] == "unpruned"]
    assert {r["train_epochs"] for r in reference} == {1.0}
    assert all(r["train_steps"] > 0 for r in reference)
    lowrank = [r for r in rows if r["method"] == "lowrank"]
    assert lowrank[0]["train_epochs"] == 1.0  # the teacher's; SVD trains nothing
    assert lowrank[0]["train_steps"] == reference[0]["train_steps"]
    mlpruning = [r for r in rows if r["method"] == "mlpruning"]
    longest = max(r["train_epochs"] for r in mlpruning)
    assert longest > 1.0 and mlpruning[0]["train_steps"] > reference[0]["train_steps"]
    equal = [r for r in rows if r["strategy"] == "unpruned-equal"]
    assert len(equal) == 2 and {r["train_epochs"] for r in equal} == {round(longest, 4)}
    assert equal[0]["train_steps"] > reference[0]["train_steps"]
    report = Path(first.report["methods"]).read_text()
    assert "unpruned-equal" in report and "teacher included" in report


def test_every_plan_is_timed_in_torch_and_onnx_at_batch_1_and_32(compared):
    home, _, _ = compared
    for row in _finals(home):
        if row["diverged"]:
            continue
        for column in ("latency_ms", "latency_b1_ms", "onnx_b1_ms", "onnx_b32_ms",
                       "int8_b1_ms", "int8_b32_ms"):
            assert row[column] is not None and row[column] > 0, (row["method"], column)
        assert row["latency_batch"] == 32
    same_plan = {}
    for row in _finals(home):
        same_plan.setdefault(row["plan"], set()).add(row["latency_ms"])
    assert all(len(times) == 1 for times in same_plan.values())  # one measurement per plan


def test_the_methods_report_has_the_table_buckets_and_pareto_plots(compared):
    _, first, _ = compared
    report = {k: Path(v) for k, v in first.report.items()}
    for key in ("methods", "methods_csv", "pareto_latency", "pareto_parameters", "report"):
        assert report[key].is_file(), key
    assert report["pareto_latency"].read_bytes()[:4] == b"\x89PNG"
    text = report["methods"].read_text()
    assert "## Which method wins where" in text and "≥1.5×" in text and "≥6×" in text
    for name in ("greedy+lowrank", "mlpruning", "lowrank", "top"):
        assert name in text
    # unpruned, greedy, top, mlpruning (its 2 seeds pooled), lowrank, 2 compositions,
    # and the unpruned model trained as long as mlpruning
    assert len(report["methods_csv"].read_text().splitlines()) == 1 + 8


def test_a_second_run_computes_nothing_and_duplicates_no_row(compared):
    home, first, second = compared
    assert second.computed == 0 and second.job_id == first.job_id
    assert len(_finals(home)) == len(first.finals)


def test_register_puts_every_method_in_the_registry_once(compared, tiny_bert):
    """--register on the comparison's cache: nothing recomputed, each compressor and
    composition under its own name with one ONNX version per size, and no row added."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from flows.params import model_slug

    home, first, _ = compared
    rows_before = len(_finals(home))
    registered = compare(_params(tiny_bert, home, register_models=True))
    assert registered.computed == 0 and registered.job_id == first.job_id
    client = MlflowClient(tracking_uri=registered.tracking_uri,
                          registry_uri=registered.tracking_uri)
    stem = f"glp-{model_slug(str(tiny_bert))}-sst2"
    budgets = {"mlpruning": "density-60", "lowrank": "ratio-2",
               "greedy1-lowrank": "ratio-2", "greedy1-mlpruning60-lowrank": "ratio-2"}
    for method, budget in budgets.items():
        versions = client.search_model_versions(f"name = '{stem}-{method}'")
        assert sorted(v.tags["glp.budget"] for v in versions) == [budget, f"{budget}-int8"], (
            method)
        assert client.get_model_version_by_alias(f"{stem}-{method}", "best").tags[
            "glp.flavor"] == "onnx"
    assert client.search_model_versions(f"name = '{stem}-greedy'")  # the layer strategies too
    rows = _finals(home)
    assert len(rows) == rows_before
    composed = [r for r in rows if r["method"] == "greedy+lowrank"]
    assert all(r["registered_model"] == f"{stem}-greedy1-lowrank" for r in composed)
    # The composition's version takes text and serves without glp.
    mlflow.set_tracking_uri(registered.tracking_uri)
    mlflow.set_registry_uri(registered.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/{stem}-greedy1-lowrank@best")
    out = served.predict(pd.DataFrame({"text": ["a fine film", "a dull one"]}))
    assert list(out.columns) == ["label", "score"] and set(out["label"]) <= {"0", "1"}
    assert ((out["score"] >= 0.5) & (out["score"] <= 1)).all()
    # Registering again adds no version.
    compare(_params(tiny_bert, home, register_models=True))
    assert len(client.search_model_versions(f"name = '{stem}-mlpruning'")) == 2


def test_methods_and_strategies_together_are_refused():
    from flows.compare import preflight
    from glp import GlpError

    with pytest.raises(GlpError, match="--strategies and --methods"):
        preflight(CompareParams(methods="greedy,lowrank", strategies="greedy,top"))


def test_compressors_alone_still_have_the_unpruned_reference(harness, tiny_bert, tmp_path):
    summary = compare(_params(tiny_bert, tmp_path, methods="lowrank", ratios=(2.0, 4.0)))
    rows = _finals(tmp_path)
    assert sorted(r["method"] for r in rows) == ["lowrank", "lowrank", "unpruned", "unpruned"]
    assert all(r["latency_ms"] for r in rows)
    assert "report" not in summary.report and Path(summary.report["methods"]).is_file()
    # Another size is another job: its rows do not replace these.
    other = compare(_params(tiny_bert, tmp_path, methods="lowrank", ratios=(3.0,)))
    assert other.job_id != summary.job_id and len(_finals(tmp_path)) == 4 + 3
