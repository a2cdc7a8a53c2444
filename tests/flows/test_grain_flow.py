"""The compress flow with GRAIN on a tiny model: rows with per-head dimension plans, models
that reload and serve as ONNX from the registry, and the cache."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
import torch
from mlflow.tracking import MlflowClient

import glp
from flows.compress import CompressParams, compress
from glp.core.plan import Plan

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests


def _params(model, home) -> CompressParams:
    return CompressParams(model=str(model), task="sst2", train_limit=80, eval_limit=40,
                          epochs=1.0, max_length=16, learning_rate=1e-3, batch_size=16,
                          method="grain", densities=(0.5, 0.3), pruning_epochs=2.0,
                          home=str(home))


@pytest.fixture(scope="module")
def two_runs(harness, tiny_bert, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    return home, compress(_params(tiny_bert, home)), compress(_params(tiny_bert, home))


def test_grain_rows_reload_register_and_repeat_from_cache(two_runs):
    home, first, second = two_runs
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    grain = sorted((r for r in rows if r["method"] == "grain"),
                   key=lambda r: -r["target_density"])
    reference = next(r for r in rows if r["method"] == "unpruned")
    assert [r["target_density"] for r in grain] == [0.5, 0.3]
    for row in grain:
        plan = Plan.from_json(row["plan"])
        assert plan.vo and plan.neurons and not plan.heads  # cut inside the heads
        assert row["encoder_density"] <= row["target_density"] + 1e-9
        assert row["encoder_density"] > row["target_density"] - 0.05
        assert row["parameters"] < reference["parameters"]
        assert row["latency_ms"] > 0
        model = glp.load_pretrained(row["model_dir"])
        tokenizer = glp.core.models.load_tokenizer(row["model_dir"])
        with torch.no_grad():
            assert model(**tokenizer(["a fine film"], return_tensors="pt")).logits.shape == (1, 2)
    # the teacher and 2 densities (one compress-model task each)
    assert (first.computed, first.reused) == (3, 0)
    assert (second.computed, second.reused) == (0, 3) and second.job_id == first.job_id
    assert len(rows) == 3  # no duplicates
    client = MlflowClient(tracking_uri=first.tracking_uri, registry_uri=first.tracking_uri)
    assert set(first.versions) == {"density-50", "density-30", "best", "density-50-int8",
                                   "density-30-int8", "best-int8"}
    version = client.get_model_version_by_alias(first.registered_model, "density-30")
    assert version.tags["glp.flavor"] == "onnx" and version.tags["glp.method"] == "grain"
    assert first.registered_model.endswith("-grain")
