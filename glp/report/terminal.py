"""What glp prints in the terminal: every result table, readable in 80 columns and in a pipe.

A table never cuts a cell (rich would end it with "…"): a cell wraps between its words,
and a word (a number, a name) stays whole on one line. A table too wide for the console
is printed in parts that each repeat its key columns; where even one column does not fit
beside them, each row is printed as ``column: value`` lines. Lines that name paths are
printed whole (soft-wrapped), so that a pipe or a copy gets them intact.
"""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from glp.report.format import score

Cell = str | Text
"""A table cell: plain text (never read as markup) or styled rich Text."""


# --------------------------------------------------------------------------- layout


def _text(cell: Cell) -> Text:
    return cell.copy() if isinstance(cell, Text) else Text(str(cell))


def _longest_word(text: Text) -> int:
    return max((cell_len(word) for word in text.plain.split()), default=0)


def _border(columns: int) -> int:
    """The characters a table with a border and one space of padding adds to its cells."""
    return 3 * columns + 1


def show(console: Console, title: str, header: Sequence[Cell], rows: Iterable[Sequence[Cell]],
         *, right: Iterable[int] = (), keys: int = 1) -> None:
    """Print a table in the console's width without cutting any cell.

    Args:
        console: where to print (its width decides the layout).
        title: above the table.
        header: the column names.
        rows: the cells of each row, as many as ``header``.
        right: the indices of the columns justified right (numbers).
        keys: the first columns that name a row; a table printed in parts repeats them.
    """
    head = [_text(h) for h in header]
    body = [[_text(c) for c in row] for row in rows]
    columns = [[h, *(row[j] for row in body)] for j, h in enumerate(head)]
    full = [max(c.cell_len for c in column) for column in columns]
    least = [max(_longest_word(c) for c in column) for column in columns]
    right = set(right)
    width = console.width
    key = list(range(min(keys, len(head))))
    if sum(least) + _border(len(head)) <= width:
        parts = [list(range(len(head)))]  # one table, some cells wrapped between words
    else:  # parts, each column on one line where it fits beside the keys
        size = list(full)
        for j in range(len(key), len(head)):
            if sum(size[i] for i in key + [j]) + _border(len(key) + 1) > width:
                size[j] = least[j]
        parts = _pack(size, key, len(head), width) or _pack(least, key, len(head), width)
    if not parts:
        _records(console, title, head, body, key)
        return
    for number, part in enumerate(parts):
        room = width - _border(len(part))
        widths = {j: least[j] for j in part}
        spare = room - sum(widths.values())
        # Widen the columns to one line per cell, those nearest to it first: as many
        # columns as the width allows read on one line.
        for j in sorted(part, key=lambda j: full[j] - least[j]):
            grow = min(full[j] - widths[j], spare)
            widths[j] += grow
            spare -= grow
        table = Table(title=Text(title if number == 0 else f"{title} (continued)"))
        for j in part:
            table.add_column(head[j], justify="right" if j in right else "left",
                             width=widths[j], overflow="fold")
        for row in body:
            table.add_row(*(row[j] for j in part))
        console.print(table)


def _pack(size: list[int], key: list[int], columns: int, width: int) -> list[list[int]]:
    """The columns after the keys, in order, in as few parts as ``width`` holds with
    ``size`` each, every part led by the keys; [] when one column does not fit."""
    parts: list[list[int]] = []
    for j in range(len(key), columns):
        if parts and sum(size[i] for i in parts[-1] + [j]) + _border(len(parts[-1]) + 1) \
                <= width:
            parts[-1].append(j)
        elif sum(size[i] for i in key + [j]) + _border(len(key) + 1) <= width:
            parts.append(key + [j])
        else:
            return []
    return parts


def _records(console: Console, title: str, head: list[Text], body: list[list[Text]],
             key: list[int]) -> None:
    """A table too wide for even one column beside its keys: one block of lines per row."""
    console.print(Text(title, style="italic"))
    for row in body:
        console.print(Text(" ").join(row[j] for j in key), style="bold")
        for j in range(len(key), len(head)):
            console.print(Text.assemble("  ", head[j], ": ", row[j]))


def _say(console: Console, text: str) -> None:
    """A line printed whole: a terminal wraps it, a pipe gets it in one piece. Printed as
    it is: a path or a name with brackets in it is never read as markup."""
    console.print(text, soft_wrap=True, markup=False)


def _pooled(values: list[float], rows: int) -> Text:
    """The dev score of a group of seeds with their count, and how many of them diverged
    (said in words, never shown as a score of 0.0)."""
    text = Text(score(statistics.mean(values), statistics.stdev(values) if len(values) > 1
                      else 0.0, len(values), counted=True) if values else "")
    if len(values) < rows:
        text.append(f"{', ' if values else ''}{rows - len(values)} of {rows} diverged",
                    style="red")
    return text


# --------------------------------------------------------------------------- glp prune


def print_counts(console: Console, summary: Any) -> None:
    """How many fine-tunes (``glp compress``: models, the teacher's fine-tune and the
    compressions) were computed and reused, the wall time and the job."""
    total = summary.computed + summary.reused
    what = "models" if getattr(summary, "method", None) else "fine-tunes"
    _say(console, f"{what}: {summary.computed} computed, "
                  f"{summary.reused} reused from cache (of {total}); "
                  f"wall time {summary.seconds:.0f} s; job {summary.job_id}")


def print_registered(console: Console, summary: Any) -> None:
    """With --register: every name the comparison registered, in the order of its rows."""
    names = list(dict.fromkeys(r["registered_model"] for r in summary.finals
                               if r.get("registered_model")))
    if names:
        _say(console, f"registered:     {', '.join(names)} "
                      "(models:/NAME@best, and its int8 graph models:/NAME@best-int8)")


def score_cell(row: dict) -> str:
    """A candidate's score, or "diverged" for a fine-tune whose loss or metric was not
    finite; ``@share`` when it was trained for a share of the budget."""
    if row.get("diverged") or row["value"] != row["value"]:
        return "diverged"
    budget = row.get("budget", 1.0)
    return f"{row['value']:.4f}" + (f"@{budget:g}" if budget < 1 else "")


def print_summary(console: Console, summary: Any) -> None:
    """The pruning order, every candidate's score, the final models, and where to look."""
    console.print()
    _say(console, f"Pruning order ({summary.strategy}, first removed first): "
                  f"{', '.join(map(str, summary.order))}")
    if summary.candidates and summary.strategy.startswith("greedy"):
        full = sum(summary.num_layers - k for k in range(len(summary.order)))
        _say(console, f"search cost: {summary.search_fine_tunes} fine-tunes, "
                      f"{summary.search_equivalents:g} whole-budget equivalents "
                      f"({summary.search_equivalents / full:.0%} of the full search's {full})")
        shares = any(row.get("budget", 1.0) < 1 for row in summary.candidates)
        rows = []
        for it in sorted({row["iteration"] for row in summary.candidates}):
            found = {r["layer"]: r for r in summary.candidates if r["iteration"] == it}
            rows.append([str(it + 1), *(
                score_cell(found[layer]) + ("*" if summary.order[it] == layer else "")
                if layer in found else "" for layer in range(summary.num_layers))])
        show(console, f"Candidates: selection-split {summary.metric} (* = removed in that "
                      "iteration" + ("; @share: the last share of the budget it was trained "
                                     "for)" if shares else ")"),
             ["iteration", *(f"-L{layer}" for layer in range(summary.num_layers))], rows,
             right=range(summary.num_layers + 1))
    distilled = any(r.get("distilled") for r in summary.finals)
    groups = sorted({(r["depth"], bool(r.get("distilled"))) for r in summary.finals},
                    key=lambda g: (-g[0], g[1]))
    inverse = {v: k for k, v in summary.versions.items() if k.startswith("depth-")}
    best = summary.versions.get("best")
    rows = []
    for depth, kd in groups:
        members = [r for r in summary.finals
                   if r["depth"] == depth and bool(r.get("distilled")) == kd]
        values = [r["value"] for r in members if not r.get("diverged")]
        version = next((r["model_version"] for r in members if r.get("model_version")), None)
        registry = ""
        if version and kd:
            registry = f"v{version} of -kd"
        elif version:
            registry = f"v{version} @{inverse.get(version, '')}"
            registry += " @best" if version == best else ""
        rows.append([str(depth), ",".join(map(str, members[0]["removed"])) or "none",
                     *(("kd" if kd else "plain",) if distilled else ()),
                     _pooled(values, len(members)), _int8_cell(members),
                     f"{members[0]['parameters']:,}" if members[0]["parameters"] else "",
                     registry])
    header = ["layers", "removed", *(("fine-tune",) if distilled else ()),
              f"dev {summary.metric}", "int8", "parameters", "registry"]
    show(console, f"Final models: dev {summary.metric}, mean ± std over seeds (none removed: "
                  "the unpruned reference); int8: the int8 ONNX graphs' own score"
                  + (" (kd: distilled from the unpruned model)" if distilled else ""),
         header, rows, right=range(len(header) - 1))
    print_counts(console, summary)
    home = Path(summary.home)
    if summary.registered_model:
        _registered_lines(console, summary.registered_model)
        if distilled:
            _say(console, f"distilled:        {summary.registered_model}-kd, "
                          "the same aliases")
    _say(console, f"MLflow UI:      glp ui --home {shlex.quote(str(home))}")
    _say(console, f"Parquet tables: {home / 'parquet'} (candidates/, selections/, finals/)")


def _int8_cell(members: Sequence[dict]) -> str:
    """The int8 graphs' dev score over the seeds that have one."""
    values = [r["int8_value"] for r in members
              if not r.get("diverged") and r.get("int8_value") is not None]
    if len(values) > 1:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    return f"{values[0]:.4f}" if values else ""


def _registered_lines(console: Console, name: str) -> None:
    _say(console, f"registered model: {name}, text in, onnxruntime: "
                  f"mlflow.pyfunc.load_model(\"models:/{name}@best\")")
    _say(console, f"                  int8: models:/{name}@best-int8; serve: mlflow models "
                  f"serve -m models:/{name}@best-int8 --env-manager local")


# --------------------------------------------------------------------------- glp compare


def _summary_cell(row: Any) -> Text:
    """A strategy's mean ± std at one depth, pooled over seeds (and random orders)."""
    alive = int(row["n"] - row["diverged"])
    text = Text(score(float(row["mean"]), float(row["std"]), alive) if alive else "")
    if row["diverged"]:
        text.append(f"{', ' if alive else ''}{row['diverged']} of {row['n']} diverged",
                    style="red")
    return text


def print_comparison(console: Console, summary: Any) -> None:
    """The mean ± std table per strategy and depth, and where the report is."""
    import pandas as pd

    from glp.report.tables import summarize

    if "report" not in summary.report:  # --methods without a layer strategy
        print_methods(console, summary)
        print_counts(console, summary)
        print_registered(console, summary)
        _say(console, f"every method:   {summary.report['methods']}")
        _say(console, f"Pareto plots:   {summary.report['pareto_latency']}")
        _say(console, f"                {summary.report['pareto_parameters']}")
        return
    layers = [r for r in summary.finals if r.get("method") in ("layers", "unpruned")]
    table = summarize(pd.DataFrame(layers), summary.num_layers)
    counts = sorted(table["removed_layers"].unique())
    rows = []
    for name in dict.fromkeys(table["label"]):
        cells = []
        for count in counts:
            match = table[(table["label"] == name) & (table["removed_layers"] == count)]
            cells.append("" if match.empty else _summary_cell(match.iloc[0]))
        rows.append([name, *cells])
    show(console, f"dev {summary.metric}: mean ± std over seeds, by layers removed",
         ["strategy", *(str(count) for count in counts)], rows, right=range(1, len(counts) + 1))
    if "methods" in summary.report:
        print_methods(console, summary)
    print_counts(console, summary)
    print_registered(console, summary)
    _say(console, f"report:         {summary.report['report']}")
    if "methods" in summary.report:
        _say(console, f"every method:   {summary.report['methods']}")
        _say(console, f"Pareto plots:   {summary.report['pareto_latency']}")
        _say(console, f"                {summary.report['pareto_parameters']}")
    _say(console, f"plots:          {summary.report['metric_vs_removed']}")
    _say(console, f"                {summary.report['metric_vs_latency']}")
    _say(console, f"Parquet tables: {Path(summary.home) / 'parquet'} (finals/ has a strategy "
                  "column)")


def print_methods(console: Console, summary: Any) -> None:
    """Every method's models, fastest first, and the best of each speed-up bucket."""
    from glp.report.pareto import TABLE_HEADER, buckets, headline, method_of, size_of, table
    from glp.report.pick import models

    found = models(summary.finals)
    columns = {"method": "method", "size": "size", f"dev {summary.metric}": "dev {metric}",
               "int8": "dev {metric} int8", "torch b32": "torch b32 ms",
               "int8 b1": "int8 b1 ms", "int8 b32": "int8 b32 ms",
               "int8 speed-up": "speed-up (int8 b32 vs unpruned int8 b32)",
               "torch speed-up": "speed-up (torch b32)"}
    index = [TABLE_HEADER.index(name) for name in columns.values()]
    rows = [[row[i] for i in index] for row in table(found, summary.metric)]
    show(console, f"Every method: dev {summary.metric} (fp32 and int8), CPU latency (ms) and "
                  "speed-up over the unpruned model in the same runtime (batch 32)",
         list(columns), rows, right=range(2, len(columns)), keys=2)
    int8 = headline(found)
    if int8:
        _say(console, "Deployed in int8 (onnxruntime, batch 32, against the unpruned int8 "
                      "graph):")
    for bucket in buckets(int8 or found):
        best = bucket["best"]
        _say(console, f"  ≥{bucket['threshold']:g}×: " + (
            f"{method_of(best)} ({size_of(best)}), {summary.metric} "
            f"{score(best.mean, best.std, best.seeds)}, {bucket['speedup']:.2f}×" if best
            else "no model that fast"))


# --------------------------------------------------------------------------- glp compress


def print_compression(console: Console, summary: Any) -> None:
    """Per density: the encoder density reached, parameters, dev score over seeds, latency
    and the registered ONNX version; then where to look."""
    groups: dict[str, list[dict]] = {}
    for row in summary.finals:
        groups.setdefault(row["variant"] or row["strategy"], []).append(row)
    inverse = {v: k for k, v in summary.versions.items() if k != "best"}
    rows = []
    for label, members in groups.items():
        values = [r["value"] for r in members if not r.get("diverged")]
        first = members[0]
        version = first.get("model_version")
        registry = f"v{version} @{inverse.get(version, '')}" if version else ""
        if version and version == summary.versions.get("best"):
            registry += " @best"
        latency, stored = first.get("latency_ms"), first.get("stored_bytes")
        rows.append([label, f"{first['encoder_density']:.3f}", f"{first['parameters']:,}",
                     f"{stored / 1e6:.1f}" if stored else "", str(first["depth"]),
                     _pooled(values, len(members)), _int8_cell(members),
                     f"{latency:.1f}" if latency else "", registry])
    show(console, f"{summary.method}: dev {summary.metric} (mean ± std over seeds; int8: "
                  "the int8 ONNX graphs' own score)",
         ["model", "encoder density", "parameters", "stored MB", "layers",
          f"dev {summary.metric}", "int8", "latency ms", "registry"], rows,
         right=range(1, 8))
    print_counts(console, summary)
    home = Path(summary.home)
    dirs = [r["model_dir"] for r in summary.finals if r["method"] not in ("unpruned", "input")
            and r.get("model_dir")]
    if dirs:
        _say(console, f"a model:        glp.load_pretrained(\"{dirs[0]}\")")
        _say(console, f"                glp export {dirs[0]} --onnx --out model.onnx")
    if summary.registered_model:
        _registered_lines(console, summary.registered_model)
    _say(console, f"MLflow UI:      glp ui --home {shlex.quote(str(home))}")
    _say(console, f"Parquet tables: {home / 'parquet'} (finals/: method, plan, parameters, "
                  "encoder_density, model_dir)")


# --------------------------------------------------------------------------- glp pick


def print_pick(console: Console, budget: Any, chosen: Any, meeting: Sequence[Any]) -> None:
    """The deployments that meet the budget (the ten best), the chosen one, its plan and
    how to serve it."""
    from glp.report.pick import ONNXRUNTIME, describe, plan_summary

    short = {"pytorch": "torch", "onnxruntime": "onnx"}
    rows = [[m.label, f"{m.precision} {short.get(m.runtime, m.runtime)}",
             score(m.mean, m.std, m.seeds, counted=True),
             f"{m.parameters:,}" if m.parameters else "",
             f"{m.latency_ms:.2f}" if m.latency_ms else "",
             f"{m.speedup:.2f}x" if m.speedup else "",
             f"v{m.uri.rsplit('/', 1)[1]}" if m.uri and m.uri.startswith("models:/") else ""]
            for m in meeting[:10]]
    show(console, f"Deployments that meet {budget.describe()} (best first; latency at batch "
                  f"{chosen.latency_batch}; onnx: onnxruntime)",
         ["model", "runs as", f"dev {chosen.metric}", "parameters", "latency ms",
          "speed-up", "version"], rows, right=range(2, 6))
    console.print(f"picked: {describe(chosen)}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"plan: {plan_summary(chosen.plan)}", markup=False, highlight=False,
                  soft_wrap=True)
    uri = chosen.uri or ""
    if uri.startswith("models:/") and chosen.runtime == ONNXRUNTIME:
        console.print(f"serve it: mlflow models serve -m {uri} --env-manager local "
                      "--port 5001", markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- glp gc


def print_garbage(console: Console, found: Sequence[tuple[Any, int]], before: int,
                  dry_run: bool) -> None:
    """What ``glp gc`` removed (or would remove), each with its size, and the total."""
    for path, size in found:
        _say(console, f"{'would remove' if dry_run else 'removed'} {path} "
                      f"({size / 1e6:,.1f} MB)")
    freed = sum(size for _, size in found)
    _say(console, f"{'would free' if dry_run else 'freed'} {freed / 1e6:,.1f} MB; the home "
                  f"{'would hold' if dry_run else 'holds'} {(before - freed) / 1e6:,.1f} MB")


# --------------------------------------------------------------------------- glp bench


def print_bench(console: Console, rows: Sequence[dict], setting: str) -> None:
    """``glp bench``'s rows: each model named once above the table, its rows by number."""
    console.print(setting, markup=False, highlight=False, soft_wrap=True)
    numbers: dict[str, str] = {}
    cells = []
    for row in rows:
        name, runtime = row["model"].rsplit(" | ", 1)
        if name not in numbers:
            numbers[name] = f"model {len(numbers) + 1}"
            console.print(f"{numbers[name]}: {name}", markup=False, highlight=False,
                          soft_wrap=True)
        cells.append([numbers[name], runtime, str(row["batch_size"]), str(row["length"]),
                      f"{row['median_ms']:.2f}", f"{row['p90_ms']:.2f}"])
    show(console, "CPU latency per batch (ms)",
         ["model", "runtime", "batch", "length", "median ms", "p90 ms"], cells,
         right=range(2, 6), keys=2)


__all__ = ["Cell", "print_bench", "print_comparison", "print_compression", "print_counts",
           "print_garbage", "print_methods", "print_pick", "print_registered", "print_summary",
           "score_cell", "show"]
