"""The cheaper greedy searches through the prune flow, on a tiny model: what each
candidate is trained for and from where, what the search cost, and the cache."""

from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest

from flows.prune import prune

pytestmark = pytest.mark.slow  # Prefect/MLflow flows: see README, Tests


def _rows(home, table):
    return ds.dataset(home / "parquet" / table).to_table().to_pylist()


def test_halving_trains_each_rung_for_its_share_and_resumes_from_cache(
        harness, tiny_bert, tmp_path, search_params, monkeypatch):
    import tasks.training

    steps = []
    real = tasks.training.fine_tune

    def spy(model, dataset, config, **kwargs):
        stats = real(model, dataset, config, **kwargs)
        steps.append((config.epochs, stats.steps))
        return stats

    monkeypatch.setattr(tasks.training, "fine_tune", spy)
    params = search_params(tiny_bert, tmp_path, search="halving", search_fraction=0.5,
                           keep_candidates=False, epochs=2.0)
    summary = prune(params)
    # Iteration 1: 3 candidates at half the budget, the better 2 at all of it; iteration
    # 2: the 2 remaining at half. 3 finals (depths 3, 2, 1).
    candidates = sorted(_rows(tmp_path, "candidates"), key=lambda r: (r["iteration"],
                                                                        r["budget"]))
    assert [(r["iteration"], r["budget"]) for r in candidates] == [
        (0, 0.5), (0, 0.5), (0, 0.5), (0, 1.0), (0, 1.0), (1, 0.5), (1, 0.5)]
    assert summary.search_fine_tunes == 7
    assert summary.search_equivalents == pytest.approx(3 * 0.5 + 2 + 2 * 0.5)
    # 68 fit examples in 5 batches of 16: 2 epochs are 10 steps, half of them 5.
    assert sorted(steps[:7]) == [(1.0, 5)] * 5 + [(2.0, 10)] * 2
    assert steps[7:] == [(2.0, 10)] * 3  # the finals get the whole budget
    assert summary.strategy == "greedy-halving-0.5"
    # The layer kept from rung 1 to rung 2 is among the better two of rung 1.
    first = [r for r in candidates if r["iteration"] == 0]
    best_two = sorted(first[:3], key=lambda r: (round(r["value"], 3),
                                                 -json.loads(r["metrics_json"])["loss"],
                                                 r["layer"]))[-2:]
    assert {r["layer"] for r in first[3:]} == {r["layer"] for r in best_two}
    again = prune(params)
    assert (again.computed, again.reused) == (0, 10) and again.order == summary.order
    assert len(_rows(tmp_path, "candidates")) == 7  # rewritten, not duplicated


def test_warm_candidates_start_from_the_shared_fine_tuned_model(
        harness, tiny_bert, tmp_path, search_params, monkeypatch):
    import torch

    import tasks.training
    from glp.core.anatomy import encoder_layers, kept_layers

    starts = []
    real = tasks.training.fine_tune

    def spy(model, dataset, config, **kwargs):
        starts.append(({i: {k: v.clone() for k, v in layer.state_dict().items()}
                        for i, layer in zip(kept_layers(model), encoder_layers(model),
                                            strict=True)}, config.epochs))
        return real(model, dataset, config, **kwargs)

    monkeypatch.setattr(tasks.training, "fine_tune", spy)
    params = search_params(tiny_bert, tmp_path, search="warm", keep_candidates=False)
    summary = prune(params)
    assert summary.strategy == "greedy-warm-0.25"
    assert summary.search_fine_tunes == 1 + 3 + 2
    assert summary.search_equivalents == pytest.approx(1 + 5 * 0.25)
    assert [epochs for _, epochs in starts] == [1.0] + [0.25] * 5 + [1.0] * 3
    # The warm start: the unpruned model, fine-tuned on the fit split and saved.
    warm = next(p for p in (tmp_path / "artifacts" / "finals").iterdir()
                if (p / "model.safetensors").exists()
                and not any(f["cache_key"] == p.name for f in summary.finals))
    from safetensors.torch import load_file

    tuned = load_file(warm / "model.safetensors")
    pretrained = starts[0][0]
    for layers, _ in starts[1:6]:  # every candidate: the warm start's weights, not the
        for index, state in layers.items():  # pre-trained ones
            name = next(n for n in tuned if n.endswith(f"layer.{index}.output.dense.weight"))
            assert torch.equal(state["output.dense.weight"], tuned[name])
            assert not torch.equal(state["output.dense.weight"],
                                   pretrained[index]["output.dense.weight"])
    for layers, _ in starts[6:]:  # the finals start from the pre-trained weights
        for index, state in layers.items():
            assert torch.equal(state["output.dense.weight"],
                               pretrained[index]["output.dense.weight"])
    again = prune(params)
    assert (again.computed, again.reused) == (0, 9) and again.order == summary.order
