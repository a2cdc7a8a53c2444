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

    def register_model(uri, run_id, path, name, job_id, depth, tags, description):
        registered.append((depth, int(tags["glp.seed"]), tags))
        return str(len(registered))

    monkeypatch.setattr(flows.registration, "register_model", register_model)
    onnx = []

    def register_onnx(uri, run_id, path, name, job_id, budget, tags, description, text):
        onnx.append((name, budget, int(tags["glp.seed"])))
        return str(len(onnx))

    monkeypatch.setattr(flows.registration, "register_onnx", register_onnx)
    monkeypatch.setattr(tasks.registry, "update_aliases", lambda uri, name, proposals: proposals)
    job = SimpleNamespace(data=SimpleNamespace(task="sst2", metric="accuracy",
                                               fingerprints={"dev": "x"}),
                          tracking_uri="sqlite://", job_id="job", common_tags={},
                          model_fp="fp", version_tags=dict,
                          text_spec={"labels": ("0", "1"), "max_length": 16, "pair": False})
    params = SimpleNamespace(model="m")
    outcome = SearchOutcome(strategy=None, plan=[(6, ()), (5, (5,)), (4, (4, 5))],
                            order=[5, 4])
    aliases = register_depths(params, job, rows, "name", outcome)
    # the ONNX twin registers the same seeds, under its own name
    assert [(b, seed) for _, b, seed in onnx] == [(f"depth-{d}", seed)
                                                  for d, seed, _ in registered]
    assert {name for name, _, _ in onnx} <= {"name-onnx"}
    return registered, aliases


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
