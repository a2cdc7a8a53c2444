"""Choosing a model by budget from final rows (glp.report.pick): fake rows, no models."""

from __future__ import annotations

import json
import math

import pytest

from glp import GlpError
from glp.report.pick import Budget, closest, models, pick


def row(strategy, depth, seed, value, *, latency=None, params=None, selection=None,
        job="job-a", variant="", method="layers", diverged=False, registered=None,
        version=None, **extra):
    plan = json.dumps({"num_layers": 6, "removed": list(range(6 - depth))})
    return {"job_id": job, "strategy": strategy, "variant": variant, "method": method,
            "model": "minilm", "task": "sst2", "metric": "accuracy", "depth": depth,
            "plan": plan, "seed": seed, "value": value,
            "selection_value": value if selection is None else selection,
            "diverged": diverged, "parameters": params, "latency_ms": latency,
            "latency_batch": 32 if latency else None, "model_dir": f"/m/{strategy}{depth}-{seed}",
            "registered_model": registered, "model_version": version, **extra}


ROWS = [
    # the unpruned reference: 100 ms, 0.80
    *[row("unpruned", 6, s, v, latency=100.0 if s == 40 else None, params=22_000_000)
      for s, v in ((40, 0.80), (41, 0.82))],
    # greedy: 5 layers 0.81 at 84 ms, 4 layers 0.79 at 67 ms, 3 layers 0.70 at 50 ms
    *[row("greedy", 5, s, v, latency=84.0, params=20_000_000, registered="glp-g",
          version="1") for s, v in ((40, 0.80), (41, 0.82))],
    *[row("greedy", 4, s, v, latency=67.0, params=18_000_000, registered="glp-g",
          version="2") for s, v in ((40, 0.78), (41, 0.80))],
    *[row("greedy", 3, s, v, latency=50.0, params=16_000_000) for s, v in
      ((40, 0.69), (41, 0.71))],
    # top, 4 layers: worse than greedy at the same speed
    *[row("top", 4, s, v, latency=66.0, params=18_000_000) for s, v in ((40, 0.74), (41, 0.76))],
]


def test_models_pool_seeds_and_measure_speedups_against_the_reference():
    found = {(m.strategy, m.depth): m for m in models(ROWS)}
    greedy4 = found["greedy", 4]
    assert greedy4.mean == pytest.approx(0.79) and greedy4.seeds == 2
    assert greedy4.std == pytest.approx(0.0141421, rel=1e-4)
    assert greedy4.speedup == pytest.approx(100 / 67)
    assert greedy4.uri == "models:/glp-g/2" and greedy4.chosen_seed == 41
    assert found["greedy", 3].uri == "/m/greedy3-41"  # not registered: its directory
    assert found["unpruned", 6].speedup == pytest.approx(1.0)


@pytest.mark.parametrize(("budget", "expected"), [
    (Budget(max_latency_ms=70), ("greedy", 4)),  # the best metric within 70 ms
    (Budget(min_speedup=1.9), ("greedy", 3)),
    (Budget(min_speedup=1.1), ("greedy", 5)),
    (Budget(max_parameters=18_000_000), ("greedy", 4)),
    (Budget(min_metric=0.785), ("greedy", 4)),  # only a floor: the fastest that reaches it
    (Budget(min_metric=0.80), ("greedy", 5)),
    (Budget(max_latency_ms=90, min_metric=0.80), ("greedy", 5)),
])
def test_pick_the_best_model_within_the_budget(budget, expected):
    chosen, meeting = pick(models(ROWS), budget)
    assert (chosen.strategy, chosen.depth) == expected
    assert all(m.meets(budget) for m in meeting) and meeting[0] is chosen


def test_nothing_meets_the_budget_names_the_closest():
    found = models(ROWS)
    budget = Budget(max_latency_ms=45)
    assert pick(found, budget) == (None, [])
    near = closest(found, budget)
    assert (near.strategy, near.depth) == ("greedy", 3)  # 50 ms: 11% over
    # the smallest total relative miss: 3 layers misses 0.9 by 22% and is fast enough;
    # 4 layers misses 60 ms by 12% and 0.9 by 12% (24%)
    near = closest(found, Budget(max_latency_ms=60, min_metric=0.9))
    assert (near.strategy, near.depth) == ("greedy", 3)


def test_unmeasured_latency_never_meets_a_latency_budget():
    rows = [row("greedy", 5, 40, 0.8, params=10), row("unpruned", 6, 40, 0.8, params=20)]
    found = models(rows)
    assert all(m.latency_ms is None for m in found)
    assert pick(found, Budget(max_latency_ms=1e9)) == (None, [])
    assert closest(found, Budget(max_latency_ms=1e9)) is None
    chosen, _ = pick(found, Budget(max_parameters=15))
    assert chosen.depth == 5


def test_diverged_seeds_are_left_out_and_a_wholly_diverged_model_is_gone():
    rows = [row("greedy", 5, 40, 0.9, latency=10.0, selection=0.99, diverged=True),
            row("greedy", 5, 41, 0.7, latency=10.0),
            row("greedy", 4, 40, math.nan, latency=5.0, diverged=True),
            row("unpruned", 6, 40, 0.8, latency=20.0)]
    found = {m.depth: m for m in models(rows)}
    assert set(found) == {5, 6}
    assert found[5].mean == 0.7 and found[5].chosen_seed == 41


def test_the_registry_rule_chooses_the_seed_by_the_selection_split():
    rows = [row("greedy", 5, 40, 0.85, selection=0.70, latency=9.0),
            row("greedy", 5, 41, 0.75, selection=0.90, latency=9.0)]
    assert models(rows)[0].chosen_seed == 41  # not the dev-best seed


def test_width_models_are_labelled_by_their_budget():
    rows = [row("grain", 6, 40, 0.77, method="grain", target_density=0.1, latency=20.0)]
    assert models(rows)[0].label == "grain, density 0.1"
    # a row has one budget's column set; the others are NaN (Parquet's nulls, read back)
    rows = [row("post-training", 6, 40, 0.8, method="post-training", latency=20.0,
                target_density=math.nan, target_ratio=math.nan, target_constraint=0.6)]
    assert models(rows)[0].label == "post-training, constraint 0.6"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "give a budget: --max-latency-ms X, --min-speedup X"),
    ({"max_latency_ms": 0.0}, "--max-latency-ms 0.0: expected a finite number above 0"),
    ({"min_speedup": math.inf}, "--min-speedup inf: expected a finite number above 0"),
    ({"min_metric": math.nan}, "--min-metric nan: expected a finite number"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(GlpError, match=message.replace("+", r"\+")):
        Budget(**kwargs)


def test_a_plan_is_summarised_in_counts_not_indices():
    from glp.report.pick import plan_summary

    assert plan_summary({"removed": [3, 5]}) == "layers removed: 3, 5"
    text = plan_summary({"removed": [], "heads": {"1": [0, 2], "0": [1, 2, 3]},
                         "neurons": {"0": list(range(40))},
                         "ranks": {"0.query": 8, "1.query": 8}})
    assert text == ("layers removed: none; heads kept per layer {0: 3, 1: 2}; FFN neurons "
                    "kept per layer {0: 40}; 2 matrices factorised (rank 8)")
