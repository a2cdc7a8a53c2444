"""The compare flow on a tiny model: shared fine-tunes, finals with a strategy column,
the report and its plots, and the MLflow run that carries them."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from mlflow.tracking import MlflowClient

from flows.compare import CompareParams, compare, parse_strategies, strategies_of
from glp import GlpError

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests

ALL = "greedy,top,bottom,random,exhaustive,block-influence,angular"


def _params(model, home, **overrides) -> CompareParams:
    values = dict(model=str(model), task="sst2", remove=2, train_limit=80, eval_limit=40,
                  epochs=1.0, max_length=16, learning_rate=1e-3, batch_size=16, seeds=2,
                  strategies=ALL, random_orders=2, home=str(home))
    return CompareParams(**{**values, **overrides})


@pytest.fixture(scope="module")
def compared(harness, tiny_bert, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    first = compare(_params(tiny_bert, home))
    second = compare(_params(tiny_bert, home))
    return home, first, second


def _rows(home: Path, table: str) -> list[dict]:
    return ds.dataset(home / "parquet" / table).to_table().to_pylist()


def test_every_strategy_has_finals_at_every_depth(compared):
    home, first, _ = compared
    finals = _rows(home, "finals")
    strategies = {r["strategy"] for r in finals}
    assert strategies == {"unpruned", "greedy", "top", "bottom", "random", "exhaustive",
                          "block-influence", "angular"}
    for strategy in strategies - {"unpruned"}:
        mine = [r for r in finals if r["strategy"] == strategy]
        orders = 2 if strategy == "random" else 1
        assert sorted(r["depth"] for r in mine) == sorted([2, 1] * 2 * orders)  # 2 seeds
    reference = [r for r in finals if r["strategy"] == "unpruned"]
    assert [r["depth"] for r in reference] == [3, 3] and all(r["removed"] == [] for r in reference)
    top = {r["depth"]: r["removed"] for r in finals if r["strategy"] == "top"}
    bottom = {r["depth"]: r["removed"] for r in finals if r["strategy"] == "bottom"}
    assert top == {2: [2], 1: [1, 2]} and bottom == {2: [0], 1: [0, 1]}
    assert {r["variant"] for r in finals if r["strategy"] == "random"} == {"seed-0", "seed-1"}
    # Latency and size per depth: fewer layers, fewer parameters.
    assert all(r["latency_ms"] > 0 and r["latency_batch"] == 32 for r in finals)
    params = {r["depth"]: r["parameters"] for r in finals}
    assert params[3] > params[2] > params[1]
    # The same removed set has the same score whichever strategy chose it.
    by_set: dict[tuple, set] = {}
    for r in finals:
        by_set.setdefault((tuple(r["removed"]), r["seed"]), set()).add(r["value"])
    assert all(len(values) == 1 for values in by_set.values())


def test_strategies_share_fine_tunes(compared):
    home, first, _ = compared
    candidates = _rows(home, "candidates")
    keys = {r["cache_key"] for r in candidates}
    # Exhaustive tries the 3 singles and 3 pairs; greedy's 3 + 2 candidates are among them.
    assert len(keys) == 6
    assert first.costs["greedy"]["fine_tunes"] == 5
    assert first.costs["exhaustive"]["fine_tunes"] == 6
    assert first.costs["top"]["fine_tunes"] == 0
    assert first.costs["block-influence"]["zero_shot_passes"] == 1
    unique_finals = {(tuple(r["removed"]), r["seed"]) for r in _rows(home, "finals")}
    assert first.computed == len(keys) + len(unique_finals)


def test_exhaustive_is_at_least_as_good_as_greedy_on_the_selection_split(compared):
    home, first, _ = compared
    candidates = _rows(home, "candidates")
    best = {}
    for r in candidates:
        size = len(r["removed"])
        best[size] = max(best.get(size, -math.inf), r["value"])
    chosen = {s["strategy"]: s for s in _rows(home, "selections") if s["iteration"] == 1}
    assert chosen["exhaustive"]["value"] == best[2]
    assert chosen["exhaustive"]["value"] >= chosen["greedy"]["value"]
    assert first.plans["exhaustive"][1] == chosen["exhaustive"]["order"]


def test_report_and_plots(compared):
    home, first, _ = compared
    report = Path(first.report["report"])
    assert report.parent.parent == home / "reports"
    text = report.read_text()
    for name in ("greedy", "top", "bottom", "random", "exhaustive", "block-influence",
                 "angular", "unpruned"):
        assert name in text
    assert "±" in text and "accuracy" in text and "glp compare" in text
    _assert_verdict_section(text, _rows(home, "finals"))
    for key in ("metric_vs_removed", "metric_vs_latency"):
        png = Path(first.report[key])
        assert png.read_bytes()[:4] == b"\x89PNG" and png.name in text
    client = MlflowClient(tracking_uri=first.tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(first.parent_run_id, "report")}
    assert {"report/report.md", "report/metric_vs_removed.png",
            "report/metric_vs_latency.png"} <= artifacts


_VERDICT = re.compile(
    r"- (\d+) removed: greedy (\d\.\d{4}) ± (\d\.\d{4}) vs top (\d\.\d{4}) ± (\d\.\d{4}) — "
    r"greedy (wins|loses|ties with top) "
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _assert_verdict_section(text: str, finals: list[dict]) -> None:
    """The greedy-vs-top section states, per removed count, the finals' mean ± std of
    both strategies and the outcome the seed-spread rule gives, with a matching tally."""
    head = "\n## Greedy against top-layer pruning\n"
    assert head in text
    section = text.split(head, 1)[1].split("\n## ", 1)[0]
    bullets = [line for line in section.splitlines() if line.startswith("- ")]
    found = [_VERDICT.match(line) for line in bullets]
    assert all(found), bullets
    assert [int(m[1]) for m in found] == [1, 2]  # remove=2 on a 3-layer model
    outcomes = []
    for m in found:
        depth = 3 - int(m[1])
        greedy = _mean_std([r["value"] for r in finals
                            if r["strategy"] == "greedy" and r["depth"] == depth])
        top = _mean_std([r["value"] for r in finals
                         if r["strategy"] == "top" and r["depth"] == depth])
        shown = [float(m[i]) for i in (2, 3, 4, 5)]
        assert shown == pytest.approx([*greedy, *top], abs=6e-5), m[0]
        diff, spread = greedy[0] - top[0], max(greedy[1], top[1])
        expected = "ties with top" if abs(diff) <= spread else ("wins" if diff > 0 else "loses")
        assert m[6] == expected, m[0]
        outcomes.append(expected.split()[0])
    tally = {o: outcomes.count(o) for o in ("wins", "ties", "loses")}
    assert (f"Over 2 depth(s), greedy wins {tally['wins']}, ties {tally['ties']} and "
            f"loses {tally['loses']}.") in section


def test_second_run_is_served_from_cache_without_duplicates(compared):
    home, first, second = compared
    assert second.computed == 0 and second.reused == first.computed
    assert second.job_id == first.job_id and second.plans == first.plans
    assert len(_rows(home, "finals")) == len(first.finals)
    assert len(_rows(home, "candidates")) == sum(c["fine_tunes"] for c in first.costs.values())


def test_strategy_names_are_checked():
    assert parse_strategies("Greedy, top,greedy") == ("greedy", "top")
    with pytest.raises(GlpError, match="unknown strategy 'middle'; choose from: greedy, top"):
        parse_strategies("greedy,middle")
    with pytest.raises(GlpError, match="no strategies"):
        parse_strategies(" , ")


def test_prefilter_adds_a_prefiltered_greedy():
    params = CompareParams(strategies="greedy,random,top", prefilter_keep=2, random_orders=3)
    labels = [s.label for s in strategies_of(params)]
    assert labels == ["greedy", "greedy-prefilter-2", "random-seed-0", "random-seed-1",
                      "random-seed-2", "top"]


def test_a_cheaper_search_adds_a_greedy_beside_the_full_one():
    params = CompareParams(strategies="greedy,top", search="halving", prefilter_keep=2)
    labels = [s.label for s in strategies_of(params)]
    assert labels == ["greedy", "greedy-prefilter-2", "greedy-halving-0.1", "top"]


@pytest.mark.parametrize(("options", "message"), [
    ({"search": "halving"}, "--search halving: only the greedy strategy searches "
                            "(--strategies top,bottom has no greedy)"),
    ({"prefilter_keep": 3}, "--prefilter-keep 3: only the greedy strategy pre-filters "
                            "(--strategies top,bottom has no greedy)"),
])
def test_greedy_options_without_greedy_are_refused(options, message):
    with pytest.raises(GlpError, match=re.escape(message)):
        strategies_of(CompareParams(strategies="top,bottom", **options))
