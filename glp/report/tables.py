"""The comparison report of layer-selection strategies: a summary table, plots, Markdown.

Everything here is a pure function of data (a frame of final models, the plans, the search
costs and the run's settings): nothing is trained, logged or tracked. ``write_report``
writes the files; the caller decides where they go next (MLflow, a CI artefact, a PR).

Figures are drawn with :class:`matplotlib.figure.Figure` directly, so no pyplot backend
is selected and nothing global is touched: this works headless and in threads.

Every metric glp reports is "higher is better" (see :mod:`glp.training.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from glp.core.errors import GlpError
from glp.methods import REFERENCE
from glp.methods import names as method_names
from glp.report.format import markdown_table, score, write_atomic, write_text

__all__ = [
    "COST_KEYS",
    "FINALS_COLUMNS",
    "REFERENCE",
    "SUMMARY_COLUMNS",
    "label",
    "plot_metric_vs_latency",
    "plot_metric_vs_removed",
    "render_markdown",
    "summarize",
    "verdicts",
    "write_report",
]

FINALS_COLUMNS: tuple[str, ...] = (
    "strategy", "variant", "depth", "removed", "seed", "metric", "value", "parameters",
    "latency_ms",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "label", "removed_layers", "depth", "n", "diverged", "mean", "std", "min", "max",
    "parameters", "latency_ms", "layers",
)
COST_KEYS: tuple[str, ...] = ("fine_tunes", "equivalents", "seconds", "zero_shot_passes")

# Strategies whose variants pool into one display label (their spread includes the
# spread over variants, e.g. random orders).
_POOLED = frozenset({"random", REFERENCE})
# Display order of strategies in tables and legends; unknown ones follow alphabetically.
_DPI = 120
_MISSING = "—"
# Keys of ``meta`` that render_markdown places itself; every other key is a setting.
_META_OWN = ("model", "task", "metric", "command", "wall_seconds", "settings")


# --------------------------------------------------------------------------- labels


def label(strategy: str, variant: str | None) -> str:
    """The display label of a strategy and its variant.

    ``strategy`` itself when the variant is empty (or None/NaN) or when the strategy pools
    its variants (``random``: all random orders form one line whose spread includes the
    spread over orders; ``unpruned``: the single reference); else ``"strategy (variant)"``.
    """
    strategy = str(strategy)
    if _blank(variant):
        return strategy
    if strategy in _POOLED:  # pooled over orders, but never with the distilled models
        return f"{strategy} (kd)" if str(variant).endswith("-kd") else strategy
    return f"{strategy} ({variant})"


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip() == ""


def _label_key(text: str) -> tuple[int, str, str]:
    """Sort key of a display label: canonical strategy order, then the variant."""
    base, _, variant = str(text).partition(" (")
    order = (REFERENCE, *method_names())  # the registry's order; unknown ones follow
    rank = order.index(base) if base in order else len(order)
    return (rank, base if rank == len(order) else "", variant)


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    return sorted(set(labels), key=_label_key)


# --------------------------------------------------------------------------- summary


def _removed_set(value: Any) -> tuple[int, ...]:
    """A removed-layer set (list, tuple, array, None/NaN for none) as a sorted tuple."""
    if value is None:
        return ()
    if isinstance(value, float) and math.isnan(value):
        return ()
    if isinstance(value, str):
        parts = value.replace("|", ",").split(",")
        return tuple(sorted(int(p) for p in parts if p.strip()))
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(sorted(int(v) for v in value))


def _format_set(layers: Sequence[int]) -> str:
    return ",".join(str(int(layer)) for layer in layers)


def _empty_summary() -> pd.DataFrame:
    frame = pd.DataFrame({column: [] for column in SUMMARY_COLUMNS})
    return frame.astype({"label": object, "removed_layers": int, "depth": int, "n": int,
                         "diverged": int,
                         "layers": object})


def summarize(finals: pd.DataFrame, num_layers: int) -> pd.DataFrame:
    """Mean, spread and cost of every display label at every number of removed layers.

    One row per (label, removed count) with columns :data:`SUMMARY_COLUMNS`: ``n`` rows
    pooled, ``diverged`` of them (NaN ``value``: left out of the statistics), ``mean``,
    ``std`` (sample std, 0 when n == 1), ``min``, ``max`` of ``value``;
    ``parameters`` (mean), ``latency_ms`` (median over measured rows, NaN if none);
    ``layers``: the distinct removed sets, each like ``"2,5"``, joined with ``" | "``
    (empty for the reference). Sorted by removed layers, then mean descending, then label.

    Raises GlpError on missing columns, more than one metric, or a depth outside
    0..num_layers.
    """
    missing = [c for c in FINALS_COLUMNS if c not in finals.columns and c != "latency_ms"]
    if missing:
        raise GlpError(f"finals lacks columns {missing}; expected {list(FINALS_COLUMNS)}")
    if finals.empty:
        return _empty_summary()
    metrics = sorted({str(m) for m in finals["metric"].dropna()})
    if len(metrics) > 1:
        raise GlpError(f"finals mixes metrics {metrics}; summarize one metric at a time")

    frame = pd.DataFrame({
        "label": [label(s, v) for s, v in zip(finals["strategy"], finals["variant"],
                                              strict=True)],
        "depth": finals["depth"].astype(int).to_numpy(),
        "value": pd.to_numeric(finals["value"], errors="coerce").to_numpy(dtype=float),
        "parameters": pd.to_numeric(finals["parameters"], errors="coerce").to_numpy(float),
        "latency_ms": (pd.to_numeric(finals["latency_ms"], errors="coerce").to_numpy(float)
                       if "latency_ms" in finals.columns else np.nan),
        "removed": [_removed_set(r) for r in finals["removed"]],
    })
    bad = sorted(set(frame["depth"][(frame["depth"] < 0) | (frame["depth"] > num_layers)]))
    if bad:
        raise GlpError(f"depths {bad} are outside 0..{num_layers} (num_layers={num_layers})")
    frame["removed_layers"] = num_layers - frame["depth"]

    rows = []
    for (name, removed_layers), group in frame.groupby(["label", "removed_layers"], sort=False):
        values = group["value"]
        std = float(values.std(ddof=1)) if values.count() > 1 else 0.0
        sets = sorted(set(group["removed"]))
        rows.append({
            "label": name,
            "removed_layers": int(removed_layers),
            "depth": int(num_layers - removed_layers),
            "n": len(group),
            # A diverged fine-tune's value is NaN: counted here, left out of the mean.
            "diverged": int(values.isna().sum()),
            "mean": float(values.mean()),
            "std": 0.0 if math.isnan(std) else std,
            "min": float(values.min()),
            "max": float(values.max()),
            "parameters": float(group["parameters"].mean()),
            "latency_ms": float(group["latency_ms"].median()),
            "layers": " | ".join(_format_set(s) for s in sets if s),
        })
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    rank = {name: i for i, name in enumerate(_sorted_labels(summary["label"]))}
    summary["_key"] = summary["label"].map(rank)
    summary = summary.sort_values(
        ["removed_layers", "mean", "_key"], ascending=[True, False, True],
        kind="mergesort", na_position="last",
    )
    return summary.drop(columns="_key").reset_index(drop=True)


# --------------------------------------------------------------------------- verdicts


def verdicts(summary: pd.DataFrame, against: str = "top", who: str = "greedy") -> list[dict]:
    """``who`` against ``against`` at every removed count where both have a mean.

    Each dict: ``removed_layers``, ``greedy_mean``, ``greedy_std`` (those of ``who``, the
    key names are fixed), ``other_mean``, ``other_std`` (``against``), ``diff`` (who minus
    against; higher is better), ``outcome``: "wins"/"loses" when ``|diff|`` exceeds the
    seed spread ``max(greedy_std, other_std)``, else "ties"; plus ``who``, ``against`` and
    ``spread``, and ``greedy_seeds``, ``other_seeds`` (the seeds behind each mean; None
    when ``summary`` has no ``n`` column).
    Sorted by removed count.
    """
    def means(name: str) -> dict[int, tuple[float, float, int | None]]:
        rows = summary[summary["label"] == name]
        return {int(r.removed_layers): (float(r.mean), float(r.std), _seeds(r))
                for r in rows.itertuples(index=False) if not math.isnan(float(r.mean))}

    mine, theirs = means(who), means(against)
    result = []
    for removed in sorted(set(mine) & set(theirs)):
        (m_mean, m_std, m_seeds), (o_mean, o_std, o_seeds) = mine[removed], theirs[removed]
        m_std, o_std = _zero_nan(m_std), _zero_nan(o_std)
        diff = m_mean - o_mean
        spread = max(m_std, o_std)
        outcome = "ties" if abs(diff) <= spread else ("wins" if diff > 0 else "loses")
        result.append({
            "removed_layers": removed, "greedy_mean": m_mean, "greedy_std": m_std,
            "other_mean": o_mean, "other_std": o_std, "diff": diff, "outcome": outcome,
            "who": who, "against": against, "spread": spread,
            "greedy_seeds": m_seeds, "other_seeds": o_seeds,
        })
    return result


def _seeds(row: Any) -> int | None:
    """The seeds behind a summary row's mean (None for a summary without counts)."""
    n = getattr(row, "n", None)
    return None if n is None else int(n - getattr(row, "diverged", 0))


def _zero_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


# --------------------------------------------------------------------------- files


def _save_figure(figure: Figure, path: Path) -> Path:
    return write_atomic(path, lambda stream: figure.savefig(
        stream, format="png", dpi=_DPI, bbox_inches="tight"))


# --------------------------------------------------------------------------- plots


def _strategies(labels: Iterable[str]) -> list[str]:
    """The labels other than the unpruned reference, in display order."""
    return [x for x in _sorted_labels(labels) if x != REFERENCE]


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    """A stable colour per label (the reference is black), shared by both plots."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    colors: dict[str, Any] = {REFERENCE: "black"}
    colors.update({name: palette[i % len(palette)] for i, name in enumerate(_strategies(labels))})
    return colors


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
DODGE = 0.05  # x offset between neighbouring strategies, in removed layers


def _markers(labels: Sequence[str]) -> dict[str, str]:
    """A marker per label, so strategies with identical results stay visible."""
    return {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(_strategies(labels))}


def _dodges(labels: Sequence[str]) -> dict[str, float]:
    """A small x offset per label, centred on 0: identical lines are drawn side by side."""
    others = _strategies(labels)
    middle = (len(others) - 1) / 2
    return {name: round((i - middle) * DODGE, 6) for i, name in enumerate(others)}


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                  frameon=False)


def plot_metric_vs_removed(
    summary: pd.DataFrame, path: Path | str, *, metric: str, title: str
) -> Path:
    """Mean metric (± std band) against removed layers, one line per label; a PNG.

    The unpruned reference is a dashed horizontal line with its own ± std band at every x,
    and it is the shared starting point (x = 0) of every strategy's line. Each strategy
    has its own marker and is shifted a little along x, so strategies that chose the same
    layers (greedy and exhaustive often do) do not hide each other.
    """
    figure = Figure(figsize=(7.5, 4.5))
    ax = figure.add_subplot()
    colors = _colors(summary["label"])
    markers, dodges = _markers(summary["label"]), _dodges(summary["label"])
    reference = summary[summary["label"] == REFERENCE]
    start = None
    if not reference.empty:
        ref = reference.iloc[0]
        start = (0, float(ref["mean"]), _zero_nan(float(ref["std"])))
        ax.axhline(start[1], color="black", linestyle="--", linewidth=1.0,
                   label=f"{REFERENCE} ({start[1]:.4f})")
        if start[2] > 0:
            ax.axhspan(start[1] - start[2], start[1] + start[2], color="black", alpha=0.06)
        ax.plot([0], [start[1]], marker="*", markersize=12, color="black", linestyle="none")
    names = _strategies(summary["label"])
    for name in names:
        rows = summary[summary["label"] == name].sort_values("removed_layers")
        points = [(int(r.removed_layers), float(r.mean), _zero_nan(float(r.std)))
                  for r in rows.itertuples(index=False)]
        if start is not None and all(x != 0 for x, _, _ in points):
            points.insert(0, start)
        xs = np.array([p[0] + (dodges[name] if p[0] else 0.0) for p in points], dtype=float)
        ys = np.array([p[1] for p in points], dtype=float)
        ss = np.array([p[2] for p in points], dtype=float)
        ax.plot(xs, ys, marker=markers[name], markersize=5, linewidth=1.5, color=colors[name],
                label=name)
        ax.fill_between(xs, ys - ss, ys + ss, color=colors[name], alpha=0.15, linewidth=0)
    if summary.empty:
        _no_data(ax, "no final models")
    else:
        top = int(summary["removed_layers"].max())
        ax.set_xticks(range(0, top + 1))
        ax.set_xlim(-0.3, top + 0.3)
    ax.set_xlabel("removed encoder layers")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return _save_figure(figure, Path(path))


def plot_metric_vs_latency(
    summary: pd.DataFrame, path: Path | str, *, metric: str, title: str
) -> Path:
    """Mean metric (± std bars) against median latency, one line per label; a PNG.

    Rows without a latency are skipped; the unpruned reference is a star.
    """
    figure = Figure(figsize=(7.5, 4.5))
    ax = figure.add_subplot()
    colors, markers = _colors(summary["label"]), _markers(summary["label"])
    measured = summary[summary["latency_ms"].notna()] if not summary.empty else summary
    for name in _sorted_labels(measured["label"]):
        rows = measured[measured["label"] == name].sort_values("latency_ms")
        xs = rows["latency_ms"].to_numpy(float)
        ys = rows["mean"].to_numpy(float)
        ss = np.nan_to_num(rows["std"].to_numpy(float))
        if name == REFERENCE:
            ax.errorbar(xs, ys, yerr=ss, marker="*", markersize=14, color="black",
                        linestyle="none", capsize=3, label=name, zorder=5)
        else:
            ax.errorbar(xs, ys, yerr=ss, marker=markers[name], markersize=5, color=colors[name],
                        linewidth=1.2, capsize=3, label=name)
    if measured.empty:
        _no_data(ax, "no latency measured")
    ax.set_xlabel("median CPU latency of a batch (ms)")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return _save_figure(figure, Path(path))


# --------------------------------------------------------------------------- markdown


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, or NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return _MISSING if number is None else f"{number:.{digits}f}"


def _fmt_int(value: Any) -> str:
    number = _number(value)
    return _MISSING if number is None else f"{round(number):,}"


def _duration(seconds: Any) -> str:
    try:
        total = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    if math.isnan(total):
        return _MISSING
    minutes, secs = divmod(round(total), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min {secs} s"
    return f"{minutes} min {secs} s" if minutes else f"{total:.1f} s"


def _setting(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _settings_section(meta: Mapping[str, Any], metric: str) -> list[str]:
    lines = []
    model, task = meta.get("model"), meta.get("task")
    intro = []
    if model is not None:
        intro.append(f"Model `{model}`")
    if task is not None:
        intro.append(f"task `{task}`")
    intro.append(f"metric `{metric}` on the final models' evaluation set (higher is better)")
    lines.append(", ".join(intro) + ".")
    settings: dict[str, Any] = {}
    nested = meta.get("settings")
    if isinstance(nested, Mapping):
        settings.update(nested)
    settings.update({k: v for k, v in meta.items() if k not in _META_OWN})
    if settings:
        lines.append("Settings: " + "; ".join(f"{k} = {_setting(v)}"
                                              for k, v in settings.items()) + ".")
    wall = meta.get("wall_seconds")
    if wall is not None:
        lines.append(f"Wall time of the run: {_duration(wall)} ({_fmt(wall, 1)} s).")
    text = [" ".join(lines)]
    command = meta.get("command")
    if command:
        fence = "````" if "```" in str(command) else "```"
        text += ["", "Produced by:", "", f"{fence}bash", str(command), fence]
    return text


def _mean_table(summary: pd.DataFrame) -> list[str]:
    counts = sorted(int(x) for x in summary["removed_layers"].unique())
    best: dict[int, float] = {}
    for removed in counts:
        at = summary[(summary["removed_layers"] == removed) & (summary["label"] != REFERENCE)]
        if len(at) > 1 and at["mean"].notna().any():
            best[removed] = float(at["mean"].max())
    cells: dict[tuple[str, int], str] = {}
    for row in summary.itertuples(index=False):
        text = _score(row.mean, row.std, row.n - row.diverged)
        if row.diverged == row.n:
            text = f"diverged ({row.n} of {row.n})"
        elif row.label != REFERENCE and best.get(int(row.removed_layers)) == float(row.mean):
            text = f"**{text}**"
        if 0 < row.diverged < row.n:
            text += f" ({row.diverged} of {row.n} diverged)"
        cells[(row.label, int(row.removed_layers))] = text
    rows = [[name] + [cells.get((name, c), _MISSING) for c in counts]
            for name in _sorted_labels(summary["label"])]
    return markdown_table(["strategy"] + [str(c) for c in counts], rows)


def _score(mean: Any, std: Any, count: int | None) -> str:
    """A mean ± std cell; one seed has no spread to show (:func:`glp.report.format.score`).
    An unknown count (None) shows the spread as given."""
    if _number(mean) is None:
        return f"{_MISSING} ± {_MISSING}"
    return score(float(mean), _zero_nan(float(std)), 0 if count is None else int(count))


def _verdict_sentence(v: Mapping[str, Any]) -> str:
    who, against = v["who"], v["against"]
    head = (f"{v['removed_layers']} removed: {who} "
            f"{_score(v['greedy_mean'], v['greedy_std'], v['greedy_seeds'])} vs "
            f"{against} {_score(v['other_mean'], v['other_std'], v['other_seeds'])} — ")
    if v["greedy_seeds"] == v["other_seeds"] == 1:  # no spread was measured
        difference = (f"difference {v['diff']:+.4f}" if v["outcome"] == "ties"
                      else f"by {abs(v['diff']):.4f}")
        verdict = f"ties with {against}" if v["outcome"] == "ties" else v["outcome"]
        return head + f"{who} {verdict} ({difference}; one seed each, no spread measured)"
    if v["outcome"] == "ties":
        return head + (f"{who} ties with {against} (difference {v['diff']:+.4f}, within "
                       f"the seed spread of {_fmt(v['spread'])})")
    return head + (f"{who} {v['outcome']} (by {abs(v['diff']):.4f}, more than the seed "
                   f"spread of {_fmt(v['spread'])})")


def _verdict_section(summary: pd.DataFrame, who: str, against: str) -> list[str]:
    found = verdicts(summary, against=against, who=who)
    if not found:
        return []
    tally = {o: sum(v["outcome"] == o for v in found) for o in ("wins", "ties", "loses")}
    lines = [
        "## Greedy against top-layer pruning", "",
        f"A difference counts only when it is larger than the seed spread (the larger of "
        f"the two sample standard deviations). Over {len(found)} depth(s), {who} wins "
        f"{tally['wins']}, ties {tally['ties']} and loses {tally['loses']}.", "",
    ]
    lines += [f"- {_verdict_sentence(v)}" for v in found]
    return lines


def _order(sets: Sequence[Sequence[int]]) -> str:
    """The removal order when each set extends the previous one by one layer."""
    order: list[int] = []
    previous: set[int] = set()
    for layers in sets:
        current = {int(x) for x in layers}
        added = current - previous
        if not previous <= current or len(added) != 1:
            return "(not nested)"
        order.append(added.pop())
        previous = current
    return " → ".join(str(x) for x in order) if order else _MISSING


def _plans_section(plans: Mapping[str, Sequence[Sequence[int]]]) -> list[str]:
    if not plans:
        return []
    width = max((len(p) for p in plans.values()), default=0)
    rows = []
    for name in _sorted_labels(plans):
        sets = [_removed_set(s) for s in plans[name]]
        cells = [_format_set(s) if s else _MISSING for s in sets]
        rows.append([name, _order(sets)] + cells + [_MISSING] * (width - len(cells)))
    return [
        "## Layers each strategy removes", "",
        "Layer indices count from 0 (the encoder layer next to the embeddings). Each column "
        "is the set removed for that many layers; the order is shown when every set adds "
        "one layer to the previous one.", "",
    ] + markdown_table(["strategy", "order"] + [f"{k} removed" for k in range(1, width + 1)],
                       rows, align=["---", "---"] + ["---"] * width)


def _costs_section(costs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not costs:
        return []
    rows = []
    for name in _sorted_labels(costs):
        cost = costs[name] or {}
        equivalents = cost.get("equivalents", cost.get("fine_tunes"))
        rows.append([name, _fmt_int(cost.get("fine_tunes")), _fmt(equivalents, 2),
                     _fmt(cost.get("seconds"), 1), _fmt_int(cost.get("zero_shot_passes"))])
    return [
        "## Search cost", "",
        "What each strategy spent to choose its layers (the final models' fine-tunes are "
        "not included). A fine-tune for a share of the budget (successive halving, a warm "
        "start's repair) counts that share in the whole-budget equivalents.", "",
    ] + markdown_table(["strategy", "fine-tunes", "whole-budget equivalents",
                        "fine-tune seconds", "zero-shot passes"], rows)


def _size_section(summary: pd.DataFrame) -> list[str]:
    if summary.empty:
        return []
    reference = summary[summary["removed_layers"] == 0]
    ref_params = float(reference["parameters"].mean()) if not reference.empty else math.nan
    ref_latency = float(reference["latency_ms"].median()) if not reference.empty else math.nan
    rows = []
    for removed, group in summary.groupby("removed_layers", sort=True):
        params = float(group["parameters"].mean())
        latency = float(group["latency_ms"].median())
        share = (f"{100 * params / ref_params:.1f} %"
                 if ref_params and not math.isnan(ref_params) and not math.isnan(params)
                 else _MISSING)
        speedup = (f"{ref_latency / latency:.2f}×"
                   if latency and not math.isnan(latency) and not math.isnan(ref_latency)
                   else _MISSING)
        rows.append([str(int(removed)), str(int(group["depth"].iloc[0])), _fmt_int(params),
                     share, _fmt(latency, 1), speedup])
    return [
        "## Parameters and latency", "",
        "Parameters of the final models and the median forward latency of one batch on the "
        "device named in the settings (over every final model with that many layers "
        "removed).", "",
    ] + markdown_table(["removed layers", "depth", "parameters", "of unpruned",
                        "median latency (ms)", "speed-up"], rows)


def render_markdown(
    summary: pd.DataFrame,
    plans: Mapping[str, Sequence[Sequence[int]]],
    costs: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
    *,
    plots: Mapping[str, str],
) -> str:
    """The comparison report as Markdown (pipe tables, no HTML), ending with a newline.

    ``meta`` keys used by name: ``model``, ``task``, ``metric``, ``command`` (shown in a
    code block), ``wall_seconds``; ``settings`` (a dict) and every other key are listed
    as settings. ``plots`` maps a caption to an image path relative to the report.
    """
    metric = str(meta.get("metric") or "metric")
    title = "# Layer pruning report"
    subject = " · ".join(str(meta[k]) for k in ("task", "model") if meta.get(k) is not None)
    if subject:
        title += f": {subject}"
    lines = [title, ""] + _settings_section(meta, metric) + [""]

    lines += ["## Mean ± std per strategy and depth", ""]
    if summary.empty:
        lines += ["No final models.", ""]
    else:
        lines += [
            f"Dev-set {metric}, mean ± sample std over the seeds (random pools all its "
            "orders, so its spread includes the spread over orders). Columns are the number "
            "of removed encoder layers; the best strategy at each depth is in bold.", "",
        ] + _mean_table(summary) + [""]

    for section in (_verdict_section(summary, "greedy", "top"), _plans_section(plans),
                    _costs_section(costs), _size_section(summary)):
        if section:
            lines += section + [""]

    if plots:
        lines += ["## Plots", ""]
        for caption, target in plots.items():
            lines += [f"![{caption}]({target})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- files


def write_report(
    folder: Path | str,
    finals: pd.DataFrame,
    num_layers: int,
    plans: Mapping[str, Sequence[Sequence[int]]],
    costs: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> dict[str, Path]:
    """Write summary.csv, the two plots and report.md into ``folder`` (created).

    Each file goes through a temporary name and ``os.replace``, so an interrupted run
    never leaves a half-written file; report.md is written last. Returns the paths under
    the keys ``report``, ``summary``, ``metric_vs_removed``, ``metric_vs_latency``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(finals, num_layers)
    metric = meta.get("metric")
    if not metric and "metric" in finals.columns and finals["metric"].notna().any():
        metric = str(finals["metric"].dropna().iloc[0])
    metric = str(metric or "metric")
    meta = {**meta, "metric": metric}
    subject = " · ".join(str(meta[k]) for k in ("task", "model") if meta.get(k) is not None)

    paths = {
        "summary": folder / "summary.csv",
        "metric_vs_removed": folder / "metric_vs_removed.png",
        "metric_vs_latency": folder / "metric_vs_latency.png",
        "report": folder / "report.md",
    }
    write_text(paths["summary"], summary.to_csv(index=False))
    plot_metric_vs_removed(summary, paths["metric_vs_removed"], metric=metric,
                           title=f"{metric} vs removed layers" + (f" — {subject}"
                                                                  if subject else ""))
    plot_metric_vs_latency(summary, paths["metric_vs_latency"], metric=metric,
                           title=f"{metric} vs latency" + (f" — {subject}" if subject else ""))
    plots = {
        f"{metric} vs removed layers": paths["metric_vs_removed"].name,
        f"{metric} vs latency": paths["metric_vs_latency"].name,
    }
    write_text(paths["report"], render_markdown(summary, plans, costs, meta, plots=plots))
    return {key: paths[key] for key in ("report", "summary", "metric_vs_removed",
                                        "metric_vs_latency")}
