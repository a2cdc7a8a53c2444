"""Which model is registered: chosen by the selection split, never by dev, never diverged."""

from __future__ import annotations

import math
from types import SimpleNamespace

import flows.registration
import tasks.registry
from flows.job import SearchOutcome
from flows.registration import register_depths
from glp.methods import REFERENCE


def _row(depth, seed, dev, selection, diverged=False, strategy="greedy"):
    return {"strategy": strategy, "depth": depth, "seed": seed, "value": dev,
            "selection_value": selection, "diverged": diverged, "removed": [5] * (6 - depth),
            "run_id": f"run-{depth}-{seed}", "_path": f"/ckpt/{depth}-{seed}", "device": "cpu"}


def _register(rows, monkeypatch):
    registered = []

    def register_onnx(uri, run_id, path, name, job_id, budget, tags, description, text,
                      int8_folder=None):
        registered.append((int(tags["glp.depth"]), int(tags["glp.seed"]), tags, budget,
                           int8_folder))
        return str(len(registered))

    monkeypatch.setattr(flows.registration, "register_onnx", register_onnx)
    monkeypatch.setattr(tasks.registry, "update_aliases", lambda uri, name, proposals: proposals)
    monkeypatch.setattr(tasks.registry, "drop_aliases", lambda uri, name, aliases: None)
    job = SimpleNamespace(data=SimpleNamespace(task="sst2", metric="accuracy",
                                               fingerprints={"dev": "x"}),
                          tracking_uri="sqlite://", job_id="job", common_tags={},
                          model_fp="fp", version_tags=dict,
                          text_spec={"labels": ("0", "1"), "max_length": 16, "pair": False})
    params = SimpleNamespace(model="m")
    outcome = SearchOutcome(strategy=None, plan=[(6, ()), (5, (5,)), (4, (4, 5))],
                            order=[5, 4])
    aliases = register_depths(params, job, rows, "name", outcome)
    fp32 = [(depth, seed, tags) for depth, seed, tags, _, folder in registered if not folder]
    int8 = [(depth, seed, folder) for depth, seed, _, _, folder in registered if folder]
    # an int8 version is the same seed's graph, the one its int8 score was measured on
    assert [(d, s) for d, s, _ in int8] == [(d, s) for d, s, _ in fp32
                                            if rows_of(rows, d, s).get("int8_value")]
    assert all(folder == f"/int8/{d}-{s}" for d, s, folder in int8)
    return fp32, aliases


def rows_of(rows, depth, seed):
    return next(r for r in rows if r["depth"] == depth and r["seed"] == seed)


def test_the_seed_and_best_follow_the_selection_split_not_dev(monkeypatch):
    rows = [
        _row(6, 40, 0.99, 0.99, strategy=REFERENCE),  # the reference is never registered
        _row(5, 40, 0.95, 0.60), _row(5, 41, 0.70, 0.80),  # dev prefers 40, selection 41
        _row(4, 40, 0.99, 0.50), _row(4, 41, 0.98, 0.55),  # dev's best depth, selection's worst
    ]
    registered, aliases = _register(rows, monkeypatch)
    assert [(depth, seed) for depth, seed, _ in registered] == [(5, 41), (4, 41)]
    assert aliases == {"depth-5": "1", "depth-4": "2", "best": "1"}
    tags = registered[0][2]
    assert tags["glp.selection_mean"] == f"{0.70:.6f}" and tags["glp.metric_mean"] == (
        f"{0.825:.6f}")


def test_a_diverged_model_is_never_registered(monkeypatch):
    nan = math.nan
    rows = [
        _row(5, 40, nan, nan, diverged=True), _row(5, 41, 0.70, 0.60),
        _row(4, 40, nan, nan, diverged=True), _row(4, 41, nan, nan, diverged=True),
    ]
    registered, aliases = _register(rows, monkeypatch)
    assert [(depth, seed) for depth, seed, _ in registered] == [(5, 41)]  # depth 4: none
    assert aliases == {"depth-5": "1", "best": "1"}
    assert registered[0][2]["glp.metric_mean"] == f"{0.70:.6f}"  # NaN left out of the mean


def test_each_registered_model_gets_its_int8_version_and_aliases(monkeypatch):
    rows = [_row(5, 40, 0.80, 0.60), _row(5, 41, 0.70, 0.80), _row(4, 40, 0.75, 0.70)]
    for row in rows:
        row["int8_value"] = row["value"] - 0.01
        row["int8_dir"] = f"/int8/{row['depth']}-{row['seed']}"
    registered, aliases = _register(rows, monkeypatch)
    assert [(depth, seed) for depth, seed, _ in registered] == [(5, 41), (4, 40)]
    # versions 1 (fp32) and 2 (int8) for depth 5, 3 and 4 for depth 4
    assert aliases == {"depth-5": "1", "depth-5-int8": "2", "depth-4": "3",
                       "depth-4-int8": "4", "best": "1", "best-int8": "2"}
    assert [r["int8_model_version"] for r in rows] == ["2", "2", "4"]
    assert [r["model_version"] for r in rows] == ["1", "1", "3"]
