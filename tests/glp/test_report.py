"""The comparison report: summary, verdicts, plots and Markdown from synthetic finals."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg

from glp import GlpError
from glp.report.format import write_atomic
from glp.report.tables import (
    SUMMARY_COLUMNS,
    label,
    plot_metric_vs_latency,
    plot_metric_vs_removed,
    render_markdown,
    summarize,
    verdicts,
    write_report,
)

NUM_LAYERS = 6
SEEDS = (0, 1, 2)
PARAMS = {6: 22_713_986, 5: 20_939_522, 4: 19_165_058}
LATENCY = {6: 30.0, 5: 25.0, 4: 20.0}
# (strategy, variant) -> removed sets for 1 and 2 layers, and the mean value at 1 and 2.
PLANS = {
    ("greedy", ""): ([(5,), (2, 5)], (0.84, 0.83)),
    ("top", ""): ([(5,), (4, 5)], (0.84, 0.80)),
    ("random", "seed-0"): ([(1,), (1, 3)], (0.78, 0.74)),
    ("random", "seed-1"): ([(3,), (0, 3)], (0.80, 0.76)),
    ("exhaustive", ""): ([(5,), (2, 5)], (0.845, 0.835)),
}
# Per-seed offsets: sample std of (-0.01, 0, +0.01) is 0.01.
OFFSETS = (-0.01, 0.0, 0.01)


def row(strategy, variant, depth, removed, seed, value, latency=None):
    return {
        "strategy": strategy, "variant": variant, "depth": depth, "removed": list(removed),
        "seed": seed, "metric": "accuracy", "value": value, "parameters": PARAMS[depth],
        "latency_ms": LATENCY[depth] + 0.1 * seed if latency is None else latency,
    }


@pytest.fixture()
def finals() -> pd.DataFrame:
    rows = [row("unpruned", "", 6, [], s, 0.85 + o) for s, o in zip(SEEDS, OFFSETS, strict=True)]
    for (strategy, variant), (sets, means) in PLANS.items():
        for k, (removed, mean) in enumerate(zip(sets, means, strict=True), start=1):
            for seed, offset in zip(SEEDS, OFFSETS, strict=True):
                rows.append(row(strategy, variant, NUM_LAYERS - k, removed, seed, mean + offset))
    return pd.DataFrame(rows)


def get(summary: pd.DataFrame, name: str, removed: int) -> pd.Series:
    match = summary[(summary["label"] == name) & (summary["removed_layers"] == removed)]
    assert len(match) == 1, (name, removed, match)
    return match.iloc[0]


# --------------------------------------------------------------------------- label


def test_label_rules():
    assert label("greedy", "") == "greedy"
    assert label("greedy", None) == "greedy"
    assert label("greedy", float("nan")) == "greedy"
    assert label("greedy", "prefilter-3") == "greedy (prefilter-3)"
    assert label("random", "seed-0") == "random"
    assert label("random", "seed-7") == "random"
    assert label("unpruned", "") == "unpruned"


# --------------------------------------------------------------------------- summarize


def test_summarize_means_stds_and_counts(finals):
    summary = summarize(finals, NUM_LAYERS)
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    greedy = get(summary, "greedy", 2)
    assert greedy["n"] == 3 and greedy["depth"] == 4
    assert greedy["mean"] == pytest.approx(0.83)
    assert greedy["std"] == pytest.approx(0.01)
    assert greedy["min"] == pytest.approx(0.82) and greedy["max"] == pytest.approx(0.84)
    assert greedy["parameters"] == PARAMS[4]
    assert greedy["latency_ms"] == pytest.approx(20.1)  # median of 20.0, 20.1, 20.2
    assert greedy["layers"] == "2,5"
    assert get(summary, "top", 1)["layers"] == "5"


def test_summarize_pools_random_variants(finals):
    summary = summarize(finals, NUM_LAYERS)
    assert "random (seed-0)" not in set(summary["label"])
    random1 = get(summary, "random", 1)
    assert random1["n"] == 6
    assert random1["mean"] == pytest.approx(0.79)
    values = [0.78 + o for o in OFFSETS] + [0.80 + o for o in OFFSETS]
    assert random1["std"] == pytest.approx(float(np.std(values, ddof=1)))
    assert random1["layers"] == "1 | 3"
    assert get(summary, "random", 2)["layers"] == "0,3 | 1,3"


def test_summarize_reference_once_and_sorting(finals):
    summary = summarize(finals, NUM_LAYERS)
    zero = summary[summary["removed_layers"] == 0]
    assert list(zero["label"]) == ["unpruned"]
    assert zero.iloc[0]["n"] == 3 and zero.iloc[0]["depth"] == NUM_LAYERS
    assert zero.iloc[0]["layers"] == ""
    assert summary.index[0] == zero.index[0]
    assert list(summary["removed_layers"]) == sorted(summary["removed_layers"])
    for _, group in summary.groupby("removed_layers"):
        assert list(group["mean"]) == sorted(group["mean"], reverse=True)
    assert list(summary[summary["removed_layers"] == 2]["label"]) == [
        "exhaustive", "greedy", "top", "random"]
    assert len(summary) == 1 + 2 * 4


def test_summarize_single_seed_has_zero_std_and_nan_latency():
    finals = pd.DataFrame([row("greedy", "", 5, [5], 0, 0.8, latency=math.nan)])
    summary = summarize(finals, NUM_LAYERS)
    only = summary.iloc[0]
    assert only["n"] == 1 and only["std"] == 0.0
    assert math.isnan(only["latency_ms"])


def test_summarize_rejects_bad_input(finals):
    with pytest.raises(GlpError, match="columns"):
        summarize(finals.drop(columns="value"), NUM_LAYERS)
    mixed = finals.copy()
    mixed.loc[0, "metric"] = "f1"
    with pytest.raises(GlpError, match="metrics"):
        summarize(mixed, NUM_LAYERS)
    with pytest.raises(GlpError, match="outside"):
        summarize(finals, 5)
    assert summarize(finals.iloc[0:0], NUM_LAYERS).empty


# --------------------------------------------------------------------------- verdicts


def summary_of(entries: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"label": name, "removed_layers": k, "mean": m, "std": s}
                         for name, k, m, s in entries])


def test_verdicts_wins_ties_loses():
    summary = summary_of([
        ("greedy", 1, 0.80, 0.010), ("top", 1, 0.78, 0.005),   # wins: 0.02 > 0.01
        ("greedy", 2, 0.79, 0.010), ("top", 2, 0.785, 0.002),  # ties: 0.005 <= 0.01
        ("greedy", 3, 0.70, 0.010), ("top", 3, 0.75, 0.020),   # loses: -0.05, |.| > 0.02
        ("greedy", 4, 0.60, 0.010),                            # no top at 4: skipped
    ])
    found = verdicts(summary)
    assert [v["removed_layers"] for v in found] == [1, 2, 3]
    assert [v["outcome"] for v in found] == ["wins", "ties", "loses"]
    first = found[0]
    assert first["greedy_mean"] == 0.80 and first["other_mean"] == 0.78
    assert first["greedy_std"] == 0.010 and first["other_std"] == 0.005
    assert first["diff"] == pytest.approx(0.02)
    assert found[2]["diff"] == pytest.approx(-0.05)


def test_verdicts_tie_inside_spread_even_with_large_difference():
    summary = summary_of([("greedy", 1, 0.80, 0.06), ("top", 1, 0.75, 0.001)])
    assert verdicts(summary)[0]["outcome"] == "ties"


def test_verdicts_any_labels(finals):
    summary = summarize(finals, NUM_LAYERS)
    found = verdicts(summary, against="random", who="exhaustive")
    assert [v["outcome"] for v in found] == ["wins", "wins"]
    assert verdicts(summary, against="bottom") == []


# --------------------------------------------------------------------------- files


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_plots_handle_missing_latency_and_empty(tmp_path, finals):
    summary = summarize(finals.assign(latency_ms=math.nan), NUM_LAYERS)
    out = plot_metric_vs_latency(summary, tmp_path / "lat.png", metric="accuracy", title="t")
    assert_png(out)
    empty = summarize(finals.iloc[0:0], NUM_LAYERS)
    assert_png(plot_metric_vs_removed(empty, tmp_path / "rem.png", metric="f1", title="t"))


def test_identical_strategies_stay_visible_in_the_plot(tmp_path, finals):
    # exhaustive found exactly greedy's sets and scores: its line must not hide greedy's.
    import glp.report.tables as report

    greedy = finals[finals["strategy"] == "greedy"]
    same = pd.concat([finals[finals["strategy"] != "exhaustive"],
                      greedy.assign(strategy="exhaustive")], ignore_index=True)
    summary = summarize(same, NUM_LAYERS)
    labels = summary["label"]
    dodges, markers = report._dodges(labels), report._markers(labels)
    assert len(set(dodges.values())) == len(dodges) and len(set(markers.values())) == len(markers)
    pixels = mpimg.imread(plot_metric_vs_removed(summary, tmp_path / "r.png", metric="accuracy",
                                                 title="t"))[..., :3]
    pixels = pixels[:, : pixels.shape[1] * 3 // 5]  # the axes only: the legend is right of it
    colors = report._colors(labels)
    for name in ("greedy", "exhaustive"):
        distance = np.abs(pixels - np.array(colors[name])[None, None, :]).max(axis=-1)
        assert (distance < 0.02).sum() > 50, f"{name}'s colour is hidden"


def test_write_report(tmp_path, finals):
    plans = {
        label(strategy, variant): [list(s) for s in sets]
        for (strategy, variant), (sets, _) in PLANS.items() if strategy != "random"
    }
    plans["random (seed-0)"] = [[1], [1, 3]]
    costs = {
        "greedy": {"fine_tunes": 11, "seconds": 1234.5, "zero_shot_passes": 0},
        "top": {"fine_tunes": 0, "seconds": 0.0, "zero_shot_passes": 0},
        "block-influence": {"fine_tunes": 0, "seconds": 0.0, "zero_shot_passes": 7},
    }
    command = "glp compare --task sst2 --remove 2 --seeds 3"
    meta = {"model": "all-MiniLM-L6-v2", "task": "sst2", "metric": "accuracy",
            "command": command, "wall_seconds": 3723.0,
            "settings": {"train_examples": 2000, "epochs": 1, "lr": 1e-4, "seeds": [0, 1, 2]}}
    folder = tmp_path / "report"
    paths = write_report(folder, finals, NUM_LAYERS, plans, costs, meta)

    assert set(paths) == {"report", "summary", "metric_vs_removed", "metric_vs_latency"}
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths.values())
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in paths.values())  # readable
    assert_png(paths["metric_vs_removed"])
    assert_png(paths["metric_vs_latency"])
    csv = pd.read_csv(paths["summary"])
    assert list(csv.columns) == list(SUMMARY_COLUMNS) and len(csv) == 9

    text = paths["report"].read_text(encoding="utf-8")
    assert text.startswith("# Layer pruning report: sst2 · all-MiniLM-L6-v2")
    assert "| strategy | 0 | 1 | 2 |" in text
    for name in ("unpruned", "greedy", "top", "random", "exhaustive"):
        assert f"| {name} |" in text
    assert "0.8500 ± 0.0100" in text and "**0.8450 ± 0.0100**" in text
    assert "## Greedy against top-layer pruning" in text
    assert "1 removed: greedy 0.8400 ± 0.0100 vs top 0.8400 ± 0.0100 — greedy ties" in text
    assert ("2 removed: greedy 0.8300 ± 0.0100 vs top 0.8000 ± 0.0100 — greedy wins "
            "(by 0.0300, more than the seed spread") in text
    assert "| greedy | 5 → 2 | 5 | 2,5 |" in text
    assert "| random (seed-0) | 1 → 3 | 1 | 1,3 |" in text
    assert "| greedy | 11 | 11.00 | 1234.5 | 0 |" in text  # no equivalents: the count
    assert "| block-influence | 0 | 0.00 | 0.0 | 7 |" in text
    assert "| 2 | 4 | 19,165,058 |" in text
    assert command in text and "1 h 2 min 3 s" in text and "train_examples = 2000" in text
    assert "](metric_vs_removed.png)" in text and "](metric_vs_latency.png)" in text
    assert "<" not in text  # no HTML


def test_render_markdown_without_greedy_or_top(finals):
    summary = summarize(finals[finals["strategy"] != "top"], NUM_LAYERS)
    text = render_markdown(summary, {}, {}, {"metric": "accuracy"}, plots={})
    assert "| strategy |" in text
    assert "Greedy against top-layer pruning" not in text
    assert "## Plots" not in text


def test_module_imports_no_heavy_dependencies():
    code = ("import sys, glp.report.tables; "
            "print(sorted(m for m in ('torch', 'prefect', 'mlflow', 'matplotlib.pyplot') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, finals, monkeypatch):
    import glp.report.tables as report

    paths = write_report(tmp_path, finals, NUM_LAYERS, {}, {}, {"metric": "accuracy"})
    before = paths["report"].read_text(encoding="utf-8")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "render_markdown", broken)
    with pytest.raises(RuntimeError):
        write_report(tmp_path, finals, NUM_LAYERS, {}, {}, {"metric": "accuracy"})
    assert paths["report"].read_text(encoding="utf-8") == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def half(stream):
        stream.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(paths["report"], half)
    assert paths["report"].read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_summarize_accepts_parquet_shapes(finals):
    """After a Parquet round trip: removed as numpy arrays, variant as None."""
    shaped = finals.assign(
        removed=[np.array(r, dtype=np.int64) for r in finals["removed"]],
        variant=[None if v == "" else v for v in finals["variant"]],
    )
    pd.testing.assert_frame_equal(summarize(shaped, NUM_LAYERS), summarize(finals, NUM_LAYERS))


def test_one_seed_reads_1_seed_in_the_report_never_a_spread_of_zero(finals):
    one = finals[finals["seed"] == SEEDS[0]]
    text = render_markdown(summarize(one, NUM_LAYERS), {}, {}, {"metric": "accuracy"},
                           plots={})
    assert "± 0.0000" not in text
    assert "| greedy | — | 0.8300 (1 seed) | 0.8200 (1 seed) |" in text  # means - 0.01
    assert "| random | — | 0.7800 ± 0.0141 | 0.7400 ± 0.0141 |" in text  # two orders
    assert ("2 removed: greedy 0.8200 (1 seed) vs top 0.7900 (1 seed) — greedy wins (by "
            "0.0300; one seed each, no spread measured)") in text


def test_both_reports_write_markdown_tables_the_same_way():
    from glp.report.format import markdown_table

    assert markdown_table(["a|b", "n"], [["x\ny", 1]]) == [
        "| a\\|b | n |", "| --- | ---: |", "| x y | 1 |"]
    assert markdown_table(["a", "b"], [], align=["---", "---"])[1] == "| --- | --- |"
