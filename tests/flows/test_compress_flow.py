"""The compress flow (MLPruning) on a tiny model: tables, models that reload and serve as
ONNX from the registry, the cache, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from mlflow.tracking import MlflowClient

import glp
from flows.compress import CompressParams, compress
from glp import GlpError
from glp.core.plan import Plan
from glp.deploy.text_model import TextModel
from tests.flows.serving import serve_in_fresh_process, serve_over_http

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests


def _params(model, home, **overrides) -> CompressParams:
    values = dict(model=str(model), task="sst2", train_limit=80, eval_limit=40, epochs=1.0,
                  max_length=16, learning_rate=1e-3, batch_size=16, seeds=2,
                  densities=(0.7, 0.6), pruning_epochs=1.0, final_epochs=1.0, home=str(home))
    return CompressParams(**{**values, **overrides})


TEXTS = ("a gripping, beautifully acted film", "the plot never comes together",
         "it is what it is " * 20)  # the last one is cut at max_length


def _finals(home):
    return ds.dataset(home / "parquet" / "finals").to_table().to_pylist()


@pytest.fixture(scope="module")
def two_runs(harness, tiny_bert, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    first = compress(_params(tiny_bert, home))
    second = compress(_params(tiny_bert, home))
    return home, first, second


def test_rows_carry_method_plan_size_and_model_dir(two_runs, tiny_bert):
    home, first, _ = two_runs
    rows = _finals(home)
    compressed = [r for r in rows if r["method"] == "mlpruning"]
    reference = [r for r in rows if r["method"] == "unpruned"]
    assert len(compressed) == 4 and len(reference) == 2  # 2 densities x 2 seeds; 2 seeds
    # Every model's dev score as deployed in int8 (text in), beside its PyTorch score.
    assert all(abs(r["int8_value"] - r["value"]) <= 0.15 for r in rows)
    folders = list((home / "artifacts" / "int8").iterdir())  # one int8 graph per model
    assert len(folders) == len({r["cache_key"] for r in rows})
    assert all((f / "model.onnx").is_file() and (f / "tokenizer.json").is_file()
               for f in folders)
    assert {r["target_density"] for r in compressed} == {0.7, 0.6}
    for row in compressed:
        plan = Plan.from_json(row["plan"])
        assert plan.heads or plan.neurons
        assert row["encoder_density"] <= row["target_density"] + 1e-9
        assert row["parameters"] < reference[0]["parameters"]
        model = glp.load_pretrained(row["model_dir"])  # tokenizer outputs in, logits out
        tokenizer = glp.core.models.load_tokenizer(row["model_dir"])
        with torch.no_grad():
            logits = model(**tokenizer(["a fine film"], return_tensors="pt")).logits
        assert logits.shape == (1, 2)
        assert json.loads(row["plan"]) == plan.to_dict()
    assert all(r["encoder_density"] == 1.0 and r["model_dir"] for r in reference)
    assert all(r["latency_ms"] > 0 for r in reference)
    # whole training, teacher included: the teacher's steps, then the method's own
    teacher = next(r for r in reference if r["seed"] == 40)
    assert all(r["train_epochs"] > teacher["train_epochs"]
               and r["train_steps"] > teacher["train_steps"] for r in compressed)


def test_second_run_is_served_from_cache_without_duplicates(two_runs):
    home, first, second = two_runs
    # 2 teachers (unpruned finals) + 2 densities x 2 seeds (one compress-model task each)
    assert (first.computed, first.reused) == (6, 0)
    assert (second.computed, second.reused) == (0, 6)
    assert second.job_id == first.job_id
    assert ([r["value"] for r in second.finals] == [r["value"] for r in first.finals])
    assert len(_finals(home)) == 6


def test_each_density_is_registered_as_onnx_and_serves(two_runs):
    import mlflow

    _, first, _ = two_runs
    client = MlflowClient(tracking_uri=first.tracking_uri, registry_uri=first.tracking_uri)
    name = first.registered_model
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.tags["glp.budget"] for v in versions) == [
        "density-60", "density-60-int8", "density-70", "density-70-int8"]
    assert set(first.versions) == {"density-60", "density-70", "best", "density-60-int8",
                                   "density-70-int8", "best-int8"}
    best = client.get_model_version_by_alias(name, "best")
    assert best.tags["glp.flavor"] == "onnx" and float(best.tags["glp.encoder_density"]) <= 0.7
    row = next(r for r in first.finals if r.get("model_version") == first.versions["density-60"]
               and r["seed"] == int(client.get_model_version(
                   name, first.versions["density-60"]).tags["glp.seed"]))
    # Text in, in a process that imports neither glp, torch nor transformers.
    served = serve_in_fresh_process(first.tracking_uri, f"models:/{name}@density-60", TEXTS)
    assert served["imported"] == [] and served["columns"] == ["label", "score"]
    model = glp.load_pretrained(row["model_dir"])
    tokenizer = glp.core.models.load_tokenizer(row["model_dir"])
    with torch.no_grad():
        batch = tokenizer(list(TEXTS), padding=True, truncation=True, max_length=16,
                          return_tensors="pt")
        probabilities = model(**batch).logits.softmax(-1)
    assert served["label"] == [str(i) for i in probabilities.argmax(-1).tolist()]
    np.testing.assert_allclose(served["score"], probabilities.max(-1).values.numpy(),
                               atol=1e-4)
    version = client.get_model_version(name, first.versions["density-60"])
    assert version.tags["glp.input"] == "text"
    assert float(version.tags["glp.int8_value"]) == pytest.approx(row["int8_value"], abs=1e-6)
    # The int8 version is the very graph its int8 score was measured on (one file on disk),
    # and it serves the same way.
    int8 = client.get_model_version(name, first.versions["density-60-int8"])
    assert int8.tags["glp.precision"] == "int8" and row["int8_model_version"] == str(int8.version)
    registered = Path(client.get_model_version_download_uri(name, int8.version).removeprefix(
        "file://")) / "artifacts" / "text_model" / "model.onnx"
    scored = [f.parent for f in (Path(first.home) / "artifacts" / "int8").glob("*/model.onnx")
              if f.samefile(registered)]
    assert len(scored) == 1
    served_int8 = serve_in_fresh_process(first.tracking_uri, f"models:/{name}@density-60-int8",
                                         TEXTS)
    assert served_int8["imported"] == []
    assert served_int8["label"] == TextModel(scored[0]).predict(list(TEXTS))["label"]
    # Each final run has its plan as an artifact, and the first seed's its latency.
    run = client.get_run(row["run_id"])
    assert "plan.json" in [a.path for a in client.list_artifacts(row["run_id"])]
    assert Plan.from_json(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/plan.json"))
    first_seed = next(r for r in first.finals if r["seed"] == 40 and r["method"] == "mlpruning")
    assert client.get_run(first_seed["run_id"]).data.metrics["latency_ms"] > 0


def test_a_changed_density_reuses_the_teacher(harness, tiny_bert, two_runs):
    home, _, _ = two_runs
    third = compress(_params(tiny_bert, home, densities=(0.65,), seeds=1, register_models=False))
    assert (third.computed, third.reused) == (1, 1)  # the compression; the teacher reused


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "electra", "distilbert", "mpnet",
                                    "deberta-v2"])
def test_every_family_compresses_end_to_end(family, harness, tiny_bert, tmp_path):
    """A tiny model of each family (MiniLM's tokenizer, so the vocabulary is 30,522):
    compressed, its row written, its model reloaded."""
    import shutil

    from transformers import AutoModel

    from tests.glp.test_surgery import tiny_config

    config = tiny_config(family)
    config.vocab_size = 30522
    torch.manual_seed(0)
    path = tmp_path / family
    AutoModel.from_config(config).save_pretrained(path)
    for file in tiny_bert.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(file, path / file.name)
    summary = compress(_params(path, tmp_path / "home", seeds=1, densities=(0.7,),
                               register_models=False))
    row = next(r for r in summary.finals if r["method"] == "mlpruning")
    assert row["encoder_density"] <= 0.7 and not row["diverged"]
    model = glp.load_pretrained(row["model_dir"])
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[101, 1037, 2986, 102]])).logits.shape == (1, 2)


@pytest.mark.parametrize(("learning_rate", "batch_size"), [(1e9, 16), (1e30, 128)])
def test_a_diverged_teacher_is_refused_not_compressed(harness, tiny_bert, tmp_path,
                                                      learning_rate, batch_size):
    """At lr 1e9 the unpruned model's fine-tune diverges: no method starts from it. At lr
    1e30 in one step (a batch of every row) its loss stays finite and its outputs are NaN:
    a diverged teacher too."""
    with pytest.raises(GlpError, match=r"the unpruned model's fine-tune \(the teacher\) "
                                       "diverged"):
        compress(_params(tiny_bert, tmp_path / "home", learning_rate=learning_rate,
                         batch_size=batch_size, seeds=1, densities=(0.7,)))


def test_block_settings_reuse_the_masks_phase(harness, tiny_bert, two_runs):
    home, _, _ = two_runs
    blocks = compress(_params(tiny_bert, home, densities=(0.6,), seeds=1, block_size=8,
                              block_density=0.5, register_models=False))
    # the teacher is reused; MLPruning's phases are one compress-model task, so block
    # settings run the whole method again (one cache path for every method)
    assert (blocks.computed, blocks.reused) == (1, 1)
    row = next(r for r in blocks.finals if r["method"] == "mlpruning")
    assert Plan.from_json(row["plan"]).blocks and row["parameters"] < next(
        r["parameters"] for r in two_runs[1].finals if r.get("target_density") == 0.6
        and r["seed"] == 40)


def test_post_training_prunes_registers_and_writes_its_rows(harness, tiny_bert, tmp_path):
    """The fifth method through the one compress path: a MAC budget, no retraining, a
    Parquet row per size, a registered version with the size's alias, a smaller model."""
    home = tmp_path / "home"
    values = dict(model=str(tiny_bert), task="sst2", train_limit=80, eval_limit=40,
                  epochs=1.0, max_length=16, learning_rate=1e-3, batch_size=16, seeds=1,
                  method="post-training", constraints=(0.6, 0.4), home=str(home))
    summary = compress(CompressParams(**values))
    rows = {r["target_constraint"]: r for r in _finals(home) if r["method"] == "post-training"}
    reference = next(r for r in _finals(home) if r["method"] == "unpruned")
    assert set(rows) == {0.6, 0.4}
    for row in rows.values():
        assert row["parameters"] < reference["parameters"] and not row["diverged"]
        assert row["train_epochs"] == reference["train_epochs"]  # nothing trained
        assert glp.load_pretrained(row["model_dir"]).num_parameters() == row["parameters"]
    assert rows[0.4]["parameters"] < rows[0.6]["parameters"]
    assert summary.registered_model == "glp-tiny-bert0-sst2-post-training"
    aliases = MlflowClient(summary.tracking_uri).get_registered_model(
        summary.registered_model).aliases
    assert {"constraint-60", "constraint-40", "best"} <= set(aliases)
    version = MlflowClient(summary.tracking_uri).get_model_version_by_alias(
        summary.registered_model, "best")
    assert "its last step not fine-tuned" in version.description  # it trained nothing


def test_a_registered_version_serves_text_over_http(two_runs):
    """`mlflow models serve` (env manager local) on a registered version, bound to
    127.0.0.1: POSTed sentences come back labelled as a pyfunc load labels them."""
    _, first, _ = two_runs
    uri = f"models:/{first.registered_model}@best"
    answer = serve_over_http(first.tracking_uri, uri, TEXTS)
    served = serve_in_fresh_process(first.tracking_uri, uri, TEXTS)
    assert [row["label"] for row in answer["predictions"]] == served["label"]
    np.testing.assert_allclose([row["score"] for row in answer["predictions"]],
                               served["score"], atol=1e-6)
