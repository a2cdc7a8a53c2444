"""The terminal tables (glp.report.terminal): readable in 80 columns, nothing cut, and a
spread only where one was measured."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from glp.report.terminal import (
    print_comparison,
    print_compression,
    print_pick,
    print_summary,
    show,
)

NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _console(width: int = 80) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, color_system=None), out


def _readable(text: str, width: int = 80) -> None:
    """No cell cut short, and every table line inside ``width`` (the lines that name a path
    are soft-wrapped: printed whole, the terminal wraps them)."""
    assert "…" not in text
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= width, text


def _numbers_whole(text: str, numbers: list[str]) -> None:
    """Each number is printed on one line, whole (not split, not cut)."""
    found = set(NUMBER.findall(text))
    for number in numbers:
        assert number in found, (number, text)


def _candidate(iteration: int, layer: int, value: float, budget: float = 1.0) -> dict:
    return {"iteration": iteration, "layer": layer, "value": value, "budget": budget}


def _final(depth: int, seed: int, value: float, version: str | None = None, **extra) -> dict:
    return {"depth": depth, "seed": seed, "value": value, "removed": list(range(12 - depth)),
            "parameters": 20_000_000 + 1_234_567 * depth, "model_version": version,
            "distilled": False, "diverged": False, **extra}


def _summary(seeds: int, layers: int = 12) -> SimpleNamespace:
    candidates = [_candidate(it, layer, 0.8 + layer / 1000 + it / 100, 0.25)
                  for it in range(2) for layer in range(layers) if layer not in (0,)[:it]]
    finals = [_final(depth, 40 + s, 0.81 + depth / 1000 + s / 100, version=str(13 - depth))
              for depth in (12, 11, 10) for s in range(seeds)]
    return SimpleNamespace(
        strategy="greedy", order=[0, 5], candidates=candidates, num_layers=layers,
        search_fine_tunes=23, search_equivalents=5.75, metric="accuracy", finals=finals,
        versions={"depth-12": "1", "depth-11": "2", "depth-10": "3", "best": "2"},
        computed=29, reused=0, seconds=1234.5, job_id="job-0123456789abcdef",
        home="/a/run/home", registered_model="glp-all-MiniLM-L12-v2-sst2-greedy")


def test_a_wide_table_fits_80_columns_and_no_number_is_cut():
    console, out = _console()
    summary = _summary(seeds=3)
    print_summary(console, summary)
    text = out.getvalue()
    _readable(text)
    # every candidate's score, whole, with its share and the chosen layer's mark
    scores = [f"{r['value']:.4f}" for r in summary.candidates]
    _numbers_whole(text, scores)
    assert "0.8000@0.25*" in text and "0.8150@0.25*" in text
    assert "(continued)" in text  # 13 columns: printed in parts that repeat the iteration
    _numbers_whole(text, [f"{r['parameters']:,}" for r in summary.finals])


def test_names_and_numbers_stay_whole_where_a_cell_must_wrap():
    console, out = _console()
    name = "glp-MiniLM-sst2-greedy2-mlpruning50-lowrank"
    rows = [[name, "density 0.5, 4 layers", "0.8123 ± 0.0100", "12.34", "56.78", "1.23×",
             "4.56×", "v12 @density-0.5 @best"]]
    show(console, "Every method", ["method", "size", "dev accuracy", "torch b1 ms",
                                   "torch b32 ms", "speed-up", "int8 b1 speed-up",
                                   "registry"], rows, right=range(2, 7), keys=2)
    text = out.getvalue()
    _readable(text)
    assert name in text  # a name is never folded or cut
    _numbers_whole(text, ["0.8123", "0.0100", "12.34", "56.78", "1.23", "4.56"])


def test_a_column_too_wide_for_the_console_prints_rows_as_lines():
    console, out = _console(width=40)
    show(console, "t", ["key", "value"], [["k" * 30, "x" * 30]])
    lines = out.getvalue().splitlines()
    assert "k" * 30 in lines and "  value: " + "x" * 30 in lines


def _wide(print_table, *args) -> str:
    """What ``print_table`` prints where no cell needs to wrap (a 200-column console)."""
    console, out = _console(200)
    print_table(console, *args)
    return out.getvalue()


def test_one_seed_prints_1_seed_never_a_spread_of_zero():
    console, out = _console()
    print_summary(console, _summary(seeds=1))
    assert "1 seed" in out.getvalue() and "± 0.0000" not in out.getvalue()
    _readable(out.getvalue())
    text = _wide(print_summary, _summary(seeds=1))
    assert "0.8220 (1 seed)" in text and "± 0.0000" not in text  # depth 12: 0.81 + 12/1000


def test_several_seeds_print_their_spread_and_count():
    assert "0.8270 ± 0.0071 (2 seeds)" in _wide(print_summary, _summary(seeds=2))


def test_a_diverged_seed_is_said_in_words():
    summary = _summary(seeds=2)
    summary.finals[0]["diverged"] = True
    assert "0.8320 (1 seed), 1 of 2 diverged" in _wide(print_summary, summary)


def test_the_comparison_shows_1_seed_for_one_seed():
    console, out = _console()
    finals = [{"strategy": s, "variant": "", "depth": d, "removed": list(range(6 - d)),
               "seed": 40, "metric": "accuracy", "value": v, "parameters": 1000 * d,
               "latency_ms": 10.0 * d, "method": "unpruned" if d == 6 else "layers"}
              for s, d, v in (("unpruned", 6, 0.9), ("greedy", 5, 0.85), ("top", 5, 0.8))]
    summary = SimpleNamespace(finals=finals, num_layers=6, metric="accuracy",
                              report={"report": "r.md", "metric_vs_removed": "a.png",
                                      "metric_vs_latency": "b.png"},
                              computed=3, reused=0, seconds=1.0, job_id="j", home="/h")
    print_comparison(console, summary)
    _readable(out.getvalue())
    text = _wide(print_comparison, summary)
    assert "0.8500 (1 seed)" in text and "± 0.0000" not in text


def test_the_compression_table_shows_1_seed():
    console, out = _console()
    finals = [{"variant": "density-50", "strategy": "mlpruning", "method": "mlpruning",
               "value": 0.8123, "encoder_density": 0.5, "parameters": 12_345_678,
               "stored_bytes": 49_000_000, "depth": 6, "latency_ms": 12.5,
               "model_version": "3", "model_dir": "/h/artifacts/finals/x"}]
    summary = SimpleNamespace(finals=finals, method="mlpruning", metric="accuracy",
                              versions={"density-50": "3", "best": "3"}, computed=1,
                              reused=0, seconds=2.0, job_id="j", home="/h",
                              registered_model="glp-m-sst2-mlpruning")
    print_compression(console, summary)
    _readable(out.getvalue())
    _numbers_whole(out.getvalue(), ["0.8123", "12,345,678", "0.500", "49.0", "12.5"])
    text = _wide(print_compression, summary)
    assert "0.8123 (1 seed)" in text and "v3 @density-50 @best" in text


def test_the_pick_table_counts_seeds():
    from glp.report.pick import Budget, models, pick
    from tests.glp.test_pick import ROWS, row

    found = models([*ROWS, row("bottom", 4, 40, 0.7, latency=60.0, params=18_000_000)])
    budget = Budget(max_latency_ms=70)
    chosen, meeting = pick(found, budget)
    console, out = _console()
    print_pick(console, budget, chosen, meeting)
    _readable(out.getvalue())
    text = _wide(print_pick, budget, chosen, meeting)
    assert "0.7900 ± 0.0141 (2 seeds)" in text and "0.7000 (1 seed)" in text
    assert "± 0.0000" not in text


@pytest.mark.parametrize("width", [80, 120, 200])
def test_every_width_keeps_the_table_inside_it(width):
    console, out = _console(width)
    print_summary(console, _summary(seeds=3))
    _readable(out.getvalue(), width)


def test_every_method_fits_80_columns_with_its_buckets():
    from glp.report.terminal import print_methods
    from tests.glp.test_pick import ROWS

    rows = [{**r, "latency_b1_ms": r["latency_ms"] and r["latency_ms"] / 10,
             "int8_b1_ms": r["latency_ms"] and r["latency_ms"] / 20,
             "int8_b32_ms": r["latency_ms"] and r["latency_ms"] / 4,
             "int8_value": r["value"] - 0.01} for r in ROWS]
    summary = SimpleNamespace(finals=rows, metric="accuracy")
    console, out = _console()
    print_methods(console, summary)
    text = out.getvalue()
    _readable(text)
    _numbers_whole(text, ["0.8100", "0.7900", "84.00", "67.00", "50.00", "4.20", "21.00",
                          "1.49"])
    # the headline is int8 against unpruned int8, with the int8 graphs' own scores
    assert "Deployed in int8" in text
    assert "  ≥1.5×: top (4 layers), accuracy 0.7400 ± 0.0141, 1.52×" in text
    assert "  ≥2×: greedy (3 layers), accuracy 0.6900 ± 0.0141, 2.00×" in text
    assert "0.7000 ± 0.0141" in text  # room enough in parts: every score on one line


def test_every_method_without_int8_keeps_the_pytorch_buckets():
    from glp.report.terminal import print_methods
    from tests.glp.test_pick import ROWS

    console, out = _console()
    print_methods(console, SimpleNamespace(finals=ROWS, metric="accuracy"))
    text = out.getvalue()
    assert "Deployed in int8" not in text
    assert "  ≥2×: greedy (3 layers), accuracy 0.7000 ± 0.0141, 2.00×" in text


def test_user_values_print_as_typed_never_as_markup_and_hints_are_quoted():
    summary = _summary(seeds=1)
    summary.home = "/tmp/my runs/[red]home[/red]"
    summary.registered_model = "glp-[bold]x"
    text = _wide(print_summary, summary)
    assert "glp ui --home '/tmp/my runs/[red]home[/red]'" in text
    assert "/tmp/my runs/[red]home[/red]/parquet" in text
    assert "glp-[bold]x" in text
