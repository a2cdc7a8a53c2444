"""The offline compress flow (lowrank, autoencoder) on a tiny model: a pre-trained input is
fine-tuned first, a fine-tuned directory or a registry URI is compressed as it is, layer
pruning composes with it, rows and registry versions are right, and a re-run is cached."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
import torch
from mlflow.tracking import MlflowClient

import glp
from flows.compress import CompressParams, compress
from glp import GlpError
from glp.core.codes import CODES_FILE
from glp.core.plan import Plan

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests


def _params(model, home, **overrides) -> CompressParams:
    values = dict(model=str(model), task="sst2", train_limit=80, eval_limit=40, epochs=1.0,
                  max_length=16, learning_rate=1e-3, batch_size=16, seeds=1,
                  method="lowrank", ratios=(2.0, 4.0), home=str(home))
    return CompressParams(**{**values, **overrides})


def _finals(home, job_id=None):
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    return [r for r in rows if job_id is None or r["job_id"] == job_id]


def _logits(model_dir):
    model = glp.load_pretrained(model_dir)
    tokenizer = glp.core.models.load_tokenizer(model_dir)
    with torch.no_grad():
        return model(**tokenizer(["a fine film", "dull"], return_tensors="pt",
                                 padding=True)).logits


@pytest.fixture(scope="module")
def lowrank(harness, tiny_bert, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    first = compress(_params(tiny_bert, home))
    second = compress(_params(tiny_bert, home))
    return home, first, second


def test_a_pretrained_input_is_fine_tuned_then_factorised(lowrank):
    home, first, _ = lowrank
    rows = _finals(home, first.job_id)
    reference = [r for r in rows if r["method"] == "unpruned"]
    compressed = sorted((r for r in rows if r["method"] == "lowrank"),
                        key=lambda r: r["target_ratio"])
    assert len(reference) == 1 and [r["target_ratio"] for r in compressed] == [2.0, 4.0]
    for row in compressed:
        plan = Plan.from_json(row["plan"])
        assert plan.ranks and plan.kind == "ranks"
        assert row["parameters"] < reference[0]["parameters"]
        assert _logits(row["model_dir"]).shape == (2, 2)
        assert row["variant"] == f"svd-ratio-{row['target_ratio']:g}"
        assert row["latency_ms"] > 0
    assert compressed[1]["parameters"] < compressed[0]["parameters"]


def test_rerun_is_cached_and_each_ratio_is_registered(lowrank):
    home, first, second = lowrank
    assert first.computed == 3 and (second.computed, second.reused) == (0, 3)
    assert second.job_id == first.job_id and len(_finals(home, first.job_id)) == 3
    client = MlflowClient(tracking_uri=first.tracking_uri, registry_uri=first.tracking_uri)
    versions = client.search_model_versions(f"name = '{first.registered_model}'")
    assert sorted(v.tags["glp.budget"] for v in versions) == [
        "ratio-2", "ratio-2-int8", "ratio-4", "ratio-4-int8"]
    assert set(first.versions) == {"ratio-2", "ratio-4", "best", "ratio-2-int8",
                                   "ratio-4-int8", "best-int8"}


def test_autoencoder_compresses_a_fine_tuned_directory_as_it_is(lowrank, tmp_path):
    home, first, _ = lowrank
    teacher = next(r for r in _finals(home, first.job_id) if r["method"] == "unpruned")
    with pytest.raises(GlpError, match="given fine-tuned.*--ae-finetune-epochs 0"):
        compress(_params(teacher["model_dir"], home, method="autoencoder", ratios=(4.0,),
                         modules=("query",), ae_epochs=1, register_models=False))
    nonlinear = compress(_params(teacher["model_dir"], home, method="autoencoder",
                                 ratios=(4.0,), modules=("query,ffn_in",), ae_epochs=2,
                                 ae_finetune_epochs=0, register_models=False))
    rows = _finals(home, nonlinear.job_id)
    given = next(r for r in rows if r["method"] == "input")
    coded = next(r for r in rows if r["method"] == "autoencoder")
    assert given["value"] == pytest.approx(teacher["value"])  # the input, scored as it is
    assert Plan.from_json(coded["plan"]).coded.keys() == {"query", "ffn_in"}
    assert coded["parameters"] == given["parameters"]  # decoded at load: same architecture
    assert coded["stored_bytes"] < given["stored_bytes"]
    from pathlib import Path

    assert (Path(coded["model_dir"]) / CODES_FILE).is_file()
    linear = compress(_params(teacher["model_dir"], home, method="autoencoder",
                              decoder="linear", ratios=(4.0,), modules=("value",),
                              ae_epochs=2, ae_finetune_epochs=0, register_models=False))
    row = next(r for r in linear.finals if r["method"] == "autoencoder")
    plan = Plan.from_json(row["plan"])
    assert plan.shared == ("value",) and row["parameters"] < given["parameters"]
    assert _logits(row["model_dir"]).shape == (2, 2)


def test_layer_pruning_then_low_rank_is_one_plan_and_a_registry_uri_works(lowrank):
    home, first, _ = lowrank
    composed = compress(_params(first.finals[0]["model"], home, prune_layers=1,
                                ratios=(2.0,), registered_model="tiny-composed"))
    row = next(r for r in composed.finals if r["method"] == "lowrank")
    plan = Plan.from_json(row["plan"])
    assert len(plan.removed) == 1 and plan.ranks and plan.depth == 2
    assert all(int(k.partition(".")[0]) not in plan.removed for k in plan.ranks)
    assert _logits(row["model_dir"]).shape == (2, 2)
    # the greedy subflow registered its depths: compress one of them from the registry
    client = MlflowClient(tracking_uri=composed.tracking_uri,
                          registry_uri=composed.tracking_uri)
    greedy = next(m.name for m in client.search_registered_models()
                  if m.name.endswith("-greedy"))
    uri = f"models:/{greedy}@depth-2"
    from_registry = compress(_params(uri, home, ratios=(2.0,), register_models=False))
    rows = {r["method"]: r for r in from_registry.finals}
    assert rows["input"]["model"] == uri and rows["lowrank"]["depth"] == 2
    with pytest.raises(GlpError, match="not found in the registry"):
        compress(_params("models:/no-such-model@best", home, register_models=False))


@pytest.mark.parametrize("plan, modules, expected", [
    (Plan(3, qk={0: (1, 2)}, vo={0: (3,)}), ("query", "ffn_in"),
     "modules query: choose other matrices, e.g. ffn_in,ffn_out \\(this model was pruned "
     "inside its attention heads"),
    (Plan(3, vo={1: (3,)}).offline({"embeddings": 8}), ("ffn_in",),
     r"already has factorised matrices \(embeddings\)"),
])
def test_a_grain_model_is_refused_up_front_where_offline_cannot_apply(plan, modules, expected,
                                                                      tmp_path):
    """A GRAIN model's attention has per-head widths, and its embeddings may be factorised
    already: compressing those is refused before anything runs."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from flows.compress import check_method, check_on_model
    from glp.core.surgery import apply_plan

    model = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64))
    apply_plan(model, plan)
    glp.core.checkpoint.save_pretrained(model, tmp_path / "grain")
    params = CompressParams(model=str(tmp_path / "grain"), method="lowrank", ratios=(2.0,),
                            modules=modules, home=str(tmp_path / "home"))
    with pytest.raises(GlpError, match=expected):
        check_on_model(*check_method(params), str(tmp_path / "grain"))


def test_autoencoder_s_paper_protocol_fine_tunes_the_coded_pretrained_model(lowrank, tiny_bert):
    """The default protocol: the pre-trained input is coded, then fine-tuned on the task
    with the codes trainable; its row counts that training, its model reloads."""
    home, _, _ = lowrank
    result = compress(_params(tiny_bert, home, method="autoencoder", ratios=(4.0,),
                              modules=("query",), ae_epochs=1, ae_finetune_epochs=1.0,
                              register_models=False))
    row = next(r for r in result.finals if r["method"] == "autoencoder")
    assert not row["diverged"] and Plan.from_json(row["plan"]).coded.keys() == {"query"}
    # its own epoch on the task, not the fine-tuned source's (which it never used)
    assert row["train_epochs"] == pytest.approx(1.0)
    assert _logits(row["model_dir"]).shape == (2, 2)
