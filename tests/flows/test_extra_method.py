"""A method registered from this file alone runs everywhere a built-in one does.

Magnitude pruning of FFN neurons (keep each layer's rows of the FFN input matrix with the
largest norms) is defined and registered here, with no edit to flows/ or tasks/; the real
``compare`` flow runs it next to greedy, and it appears in Parquet, in the report, in
``pick``, and composes after greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from glp.methods import (
    Context,
    Method,
    Outcome,
    check_number,
    get_method,
    param,
    register_method,
    unregister_method,
)

pytestmark = pytest.mark.slow  # a Prefect flow on a tiny model


@dataclass(frozen=True)
class MagnitudeParams:
    density: float = param(0.5, "fraction of each layer's FFN neurons to keep")

    def __post_init__(self):
        check_number("density", self.density, 0 < self.density <= 1, "a fraction in (0, 1]")


def magnitude(context: Context, params: MagnitudeParams) -> Outcome:
    """Keep the FFN neurons whose input rows have the largest norms; no training."""
    from glp.core.anatomy import encoder_layers, kept_layers, role_module
    from glp.core.plan import Plan, plan_of_model
    from glp.core.surgery import apply_plan

    model = context.model
    base = plan_of_model(model)
    neurons = {}
    for original, layer in zip(kept_layers(model), encoder_layers(model), strict=True):
        rows = role_module(model, layer, "ffn_in").weight.norm(dim=1)
        keep = max(1, math.ceil(params.density * len(rows)))
        neurons[original] = sorted(rows.topk(keep).indices.tolist())
    plan = Plan(base.num_layers, base.removed, neurons=neurons)
    apply_plan(model, plan)
    return Outcome(model, plan, [{"phase": "magnitude", "steps": 0, "seconds": 0.0,
                                  "final_loss": 0.0, "diverged": False}])


MAGNITUDE = Method(name="magnitude", family="width",
                   summary="magnitude pruning of FFN neurons (no training)",
                   params=MagnitudeParams, budget="density", run=magnitude,
                   deterministic=True, followed_by=frozenset({"offline"}))


@pytest.fixture(scope="module")
def compared(harness, tiny_bert, tmp_path_factory):
    from flows.compare import CompareParams, compare

    register_method(MAGNITUDE)
    try:
        home = tmp_path_factory.mktemp("home")
        params = CompareParams(model=str(tiny_bert), task="sst2", remove=1, train_limit=80,
                               eval_limit=40, epochs=1.0, max_length=16, learning_rate=1e-3,
                               batch_size=16, seeds=1, methods="greedy,magnitude,"
                               "greedy+magnitude", densities=(0.5,), home=str(home))
        summary = compare(params)
        again = compare(params)
        yield home, summary, again
    finally:
        unregister_method("magnitude")


def test_the_registered_method_is_known_by_name():
    register_method(MAGNITUDE)
    try:
        assert get_method("magnitude").module == __name__
        from flows.methods import parse_methods

        assert parse_methods("greedy,magnitude,greedy+magnitude") == (
            "greedy", "magnitude", "greedy+magnitude")
    finally:
        unregister_method("magnitude")


def test_its_models_are_in_parquet_with_their_plan(compared):
    home, _, _ = compared
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    mine = [r for r in rows if r["method"] == "magnitude"]
    assert len(mine) == 1 and mine[0]["variant"] == "density-50"
    assert mine[0]["target_density"] == 0.5 and not mine[0]["diverged"]
    assert '"neurons"' in mine[0]["plan"] and Path(mine[0]["model_dir"]).is_dir()
    unpruned = next(r for r in rows if r["method"] == "unpruned")
    assert mine[0]["parameters"] < unpruned["parameters"]
    composed = [r for r in rows if r["method"] == "greedy+magnitude"]
    assert len(composed) == 1 and composed[0]["depth"] == 2  # 3 layers less one, then width


def test_it_is_in_the_report_and_pick(compared):
    from glp.report.pick import Budget, models, pick

    home, summary, _ = compared
    assert "magnitude" in Path(summary.report["methods"]).read_text()
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    found = {m.method for m in models(rows)}
    assert {"magnitude", "greedy+magnitude"} <= found
    chosen, _ = pick([m for m in models(rows) if m.method == "magnitude"],
                     Budget(min_metric=0.0))
    assert chosen is not None and chosen.method == "magnitude"


def test_a_second_run_reuses_its_compressed_model(compared):
    _, first, again = compared
    mine = [r for r in first.finals if r["method"] == "magnitude"]
    reused = [r for r in again.finals if r["method"] == "magnitude"]
    assert [r["cache_key"] for r in reused] == [r["cache_key"] for r in mine]
    assert again.computed == 0
