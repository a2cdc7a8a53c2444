"""The prune flow on a tiny model: tables, MLflow runs and registry, and the cache."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest
from mlflow.tracking import MlflowClient

from flows.prune import PruneParams, prune

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests


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
    # The chosen layer has the best score of its iteration (scores rounded to 3
    # decimals as the reference does; ties: highest index).
    for selection in selections:
        rows = [r for r in candidates if r["iteration"] == selection["iteration"]]
        best = max(rows, key=lambda r: (round(r["value"], 3), r["layer"]))
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
    # depths 2 and 1, each as fp32 and int8, once each
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    best = client.get_model_version_by_alias(name, "best")
    assert best.tags["glp.task"] == "sst2" and best.tags["glp.strategy"] == "greedy"
    assert best.tags["glp.removed_layers"]
    for tag in ("glp.model", "glp.metric", "glp.data_fingerprint", "glp.version",
                "glp.base_model_fingerprint", "glp.order", "glp.metric_mean",
                "glp.selection_mean", "glp.selection_fingerprint", "glp.device"):
        assert best.tags[tag], tag
    # The registered seed and `best` are chosen by the selection split, never by dev.
    finals = _rows(home, "finals")
    by_version = {}
    for row in finals:
        if row["model_version"]:
            by_version.setdefault(row["model_version"], []).append(row)
    selection_means = {v: sum(r["selection_value"] for r in rows) / len(rows)
                       for v, rows in by_version.items()}
    assert selection_means[str(best.version)] == max(selection_means.values())
    depth_1 = client.get_model_version_by_alias(name, "depth-1")
    assert depth_1.tags["glp.removed_layers"] == ",".join(map(str, sorted(first.order)))
    # Every version takes text and runs on onnxruntime; the int8 one is the same seed's
    # graph, quantised, with the int8 score measured on it.
    assert depth_1.tags["glp.flavor"] == "onnx" and depth_1.tags["glp.precision"] == "fp32"
    int8 = client.get_model_version_by_alias(name, "depth-1-int8")
    assert int8.tags["glp.precision"] == "int8" and int8.tags["glp.budget"] == "depth-1-int8"
    assert int8.tags["glp.seed"] == depth_1.tags["glp.seed"]
    assert float(int8.tags["glp.int8_value"]) == pytest.approx(next(
        r["int8_value"] for r in finals if r["model_version"] == str(depth_1.version)))
    assert (client.get_model_version_by_alias(name, "best-int8").tags["glp.depth"]
            == best.tags["glp.depth"])
    assert {r["int8_model_version"] for r in finals if r["model_version"]} == {
        str(v.version) for v in versions if v.tags["glp.precision"] == "int8"}
    # The fp32 version is also the model directory, its weights one file with the
    # checkpoint's on disk (a hard link), shared by its ONNX graph.
    folder = Path(client.get_model_version_download_uri(name, depth_1.version).removeprefix(
        "file://")) / "artifacts" / "text_model"
    checkpoint = next(r["model_dir"] for r in finals if r["model_version"] == str(
        depth_1.version) and str(r["seed"]) == depth_1.tags["glp.seed"])
    assert (folder / "model.safetensors").samefile(Path(checkpoint) / "model.safetensors")
    assert (folder / "model.onnx").stat().st_size < 1_000_000


def test_changed_config_does_not_reuse(harness, tiny_bert, two_runs):
    home, first, _ = two_runs
    third = prune(_params(tiny_bert, home, remove=1, search_seed=7, register_models=False))
    assert third.job_id != first.job_id
    # A new search seed: 3 new candidate fine-tunes. The unpruned final model does not
    # depend on the search, so it is reused.
    assert third.computed >= 3
    assert third.reused >= 1


def test_a_finished_run_keeps_only_the_final_models_weights(two_runs):
    home, first, _ = two_runs
    weights = sorted(p.parent.parent.name for p in (home / "artifacts").rglob("model.safetensors"))
    assert weights == ["finals"] * 3  # 3 depths x 1 seed; no candidate was kept
    assert not list((home / "artifacts").glob("*/*.tmp-*"))
    assert {r["device"] for r in _rows(home, "candidates") + _rows(home, "finals")} == {"cpu"}
    assert not any(r["diverged"] for r in _rows(home, "candidates") + _rows(home, "finals"))


def test_keep_candidates_keeps_their_weights(harness, tiny_bert, tmp_path):
    summary = prune(_params(tiny_bert, tmp_path, remove=1, register_models=False,
                            keep_candidates=True))
    kept = list((tmp_path / "artifacts" / "candidates").glob("*/model.safetensors"))
    assert len(kept) == 3 and len(summary.candidates) == 3


def test_a_changed_learning_rate_recomputes_everything(harness, tiny_bert, two_runs):
    home, first, _ = two_runs
    changed = prune(_params(tiny_bert, home, learning_rate=2e-3, register_models=False))
    assert (changed.computed, changed.reused) == (8, 0)


def test_a_changed_library_source_recomputes_everything(harness, tiny_bert, two_runs,
                                                         monkeypatch):
    """An edit of glp/training/train.py (or any module a fine-tune runs) changes the code
    fingerprint in every cache key; simulated here through the fingerprint's input, the
    source of the modules (tests/glp/test_provenance.py edits real files)."""
    import glp.core.provenance

    home, first, _ = two_runs
    real = glp.core.provenance.source_closure

    def edited(*modules):
        closure = real(*modules)
        edited_train = home / "edited_train.py"
        edited_train.write_text(closure["glp.training.train"].read_text() + "\n# an edit\n")
        return {**closure, "glp.training.train": edited_train}

    monkeypatch.setattr(glp.core.provenance, "source_closure", edited)
    glp.core.provenance.clear_cache()
    try:
        changed = prune(_params(tiny_bert, home, register_models=False))
    finally:
        glp.core.provenance.clear_cache()
    assert (changed.computed, changed.reused) == (8, 0)
    # A new job: its own MLflow run and registered versions, not a rewrite of the old.
    assert changed.job_id != first.job_id


def test_every_candidate_starts_from_the_pre_trained_weights(harness, tiny_bert, tmp_path,
                                                            monkeypatch):
    """Not from an earlier candidate's fine-tune: when a candidate's training starts, every
    remaining layer holds the pre-trained weights of the original layer it came from."""
    import torch
    from transformers import AutoModel

    import tasks.training
    from glp.core.anatomy import encoder_layers, kept_layers

    pretrained = AutoModel.from_pretrained(tiny_bert)
    original = [layer.state_dict() for layer in encoder_layers(pretrained)]
    real = tasks.training.fine_tune
    checked = []

    def spy(model, *args, **kwargs):
        for index, layer in zip(kept_layers(model), encoder_layers(model), strict=True):
            for name, tensor in layer.state_dict().items():
                assert torch.equal(tensor, original[index][name]), (index, name)
        checked.append(tuple(kept_layers(model)))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tasks.training, "fine_tune", spy)
    prune(_params(tiny_bert, tmp_path, register_models=False))
    assert len(checked) == 8  # 3 + 2 candidates (the second iteration's too), 3 finals


@pytest.mark.parametrize(("task", "metric"), [("mrpc", "f1"), ("stsb", "spearman")])
def test_a_pair_task_and_a_regression_task_run_end_to_end(harness, tiny_bert, tmp_path, task,
                                                          metric):
    summary = prune(_params(tiny_bert, tmp_path, task=task, remove=1, train_limit=60,
                            eval_limit=30, max_length=32))
    assert summary.metric == metric and len(summary.order) == 1
    assert len(summary.candidates) == 3 and len(summary.finals) == 2
    assert all(c["metric"] == metric for c in summary.candidates)
    assert summary.versions.get("depth-2") and summary.versions.get("best")
    if task == "stsb":  # one regression output, a real-valued score
        from glp.core.models import load_classifier

        path = next((tmp_path / "artifacts" / "finals").glob("*/config.json")).parent
        model = load_classifier(path, num_labels=1, is_regression=True)
        assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_distill_fine_tunes_every_pruned_depth_from_the_unpruned_teacher(harness, tiny_bert,
                                                                          tmp_path):
    params = _params(tiny_bert, tmp_path, remove=1, seeds=2, distill=True)
    first = prune(params)
    # 3 candidates; finals: the unpruned model (the teacher is its seed 40) and depth 2,
    # each with 2 seeds, and depth 2 distilled with 2 seeds.
    assert first.computed == 9
    finals = _rows(tmp_path, "finals")
    kd = [r for r in finals if r["variant"] == "kd"]
    assert sorted(r["seed"] for r in kd) == [40, 41]
    assert all(r["distilled"] and r["depth"] == 2 and r["strategy"] == "greedy" for r in kd)
    plain = [r for r in finals if r["variant"] != "kd"]
    assert all(r["distilled"] is False for r in plain) and len(plain) == 4
    # The same architecture, other weights.
    twins = {r["seed"]: r for r in plain if r["depth"] == 2}
    for row in kd:
        assert row["removed"] == twins[row["seed"]]["removed"]
        assert row["cache_key"] != twins[row["seed"]]["cache_key"]
    client = MlflowClient(tracking_uri=first.tracking_uri, registry_uri=first.tracking_uri)
    distilled = client.get_model_version_by_alias(f"{first.registered_model}-kd", "depth-2")
    assert "distillation from the unpruned model" in distilled.description
    assert distilled.run_id in {r["run_id"] for r in kd}
    assert client.get_model_version_by_alias(first.registered_model, "depth-2").run_id in {
        r["run_id"] for r in plain}
    # Without --distill it is another job; with it again, nothing is recomputed.
    again = prune(params)
    assert again.computed == 0 and again.job_id == first.job_id
    assert prune(params.model_copy(update={"distill": False})).job_id != first.job_id
    assert len([r for r in _rows(tmp_path, "finals") if r["variant"] == "kd"]) == 2


def test_a_layer_pruned_version_serves_text_over_http(two_runs):
    """A layer-pruned model's int8 version, served by `mlflow models serve` (127.0.0.1),
    labels POSTed sentences as glp's own int8 evaluation of the same graph does; its fp32
    version as the PyTorch model does."""
    import numpy as np
    import torch

    import glp
    from glp.deploy.text_model import TextModel
    from tests.flows.serving import serve_over_http

    texts = ["a gripping, beautifully acted film", "the plot never comes together",
             "it is what it is"]
    home, first, _ = two_runs
    client = MlflowClient(tracking_uri=first.tracking_uri, registry_uri=first.tracking_uri)
    name = first.registered_model
    int8 = client.get_model_version_by_alias(name, "depth-1-int8")
    answer = serve_over_http(first.tracking_uri, f"models:/{name}@depth-1-int8", texts)
    graph = Path(client.get_model_version_download_uri(name, int8.version).removeprefix(
        "file://")) / "artifacts" / "text_model" / "model.onnx"
    scored = next(f.parent for f in (home / "artifacts" / "int8").glob("*/model.onnx")
                  if f.samefile(graph))  # the graph the int8 score was measured on
    expected = TextModel(scored).predict(texts)
    assert [row["label"] for row in answer["predictions"]] == expected["label"]
    np.testing.assert_allclose([row["score"] for row in answer["predictions"]],
                               expected["score"], atol=1e-6)
    fp32 = serve_over_http(first.tracking_uri, f"models:/{name}@depth-1", texts)
    version = str(client.get_model_version_by_alias(name, "depth-1").version)
    row = next(r for r in _rows(home, "finals") if r["model_version"] == version
               and str(r["seed"]) == int8.tags["glp.seed"])
    model, tokenizer = (glp.load_pretrained(row["model_dir"]),
                        glp.core.models.load_tokenizer(row["model_dir"]))
    with torch.no_grad():
        probabilities = model(**tokenizer(texts, padding=True, truncation=True, max_length=16,
                                          return_tensors="pt")).logits.softmax(-1)
    assert [r["label"] for r in fp32["predictions"]] == [
        str(i) for i in probabilities.argmax(-1).tolist()]
    np.testing.assert_allclose([r["score"] for r in fp32["predictions"]],
                               probabilities.max(-1).values.numpy(), atol=1e-4)


@pytest.mark.parametrize("batch_size", [16, 128])
def test_a_search_where_every_candidate_diverged_fails_naming_it(harness, tiny_bert, tmp_path,
                                                                 batch_size):
    """At lr 1e30 every candidate diverges: a NaN training loss (several steps), or with one
    step a finite loss and then NaN outputs. There is nothing to choose from, and a prune
    that reported "remove layer 5" would register an arbitrary model."""
    from glp import GlpError

    home = tmp_path / "home"
    with pytest.raises(GlpError, match=r"every candidate of greedy iteration 1 diverged.*"
                                       r"lower --lr \(1e\+30\)"):
        prune(_params(tiny_bert, home, learning_rate=1e30, remove=1, batch_size=batch_size))
    assert not (home / "parquet" / "finals").exists()
