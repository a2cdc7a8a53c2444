"""The cross-method report: every method's models on one quality/speed/size picture.

Input: the models of one comparison (:func:`glp.report.pick.models`: a job's plan, its seeds
pooled). Output, under one folder: ``methods.csv`` (a row per model), two Pareto plots
(the dev metric against the measured CPU latency, and against the parameters, every
method in its own colour, the frontier drawn and its members ringed) and ``methods.md``:
the table, the best model of each speed-up bucket, and plain sentences on which method
wins where, with the seed spread. Speed-ups are against the unpruned model in the same
runtime and batch, measured beside it in one run. The headline is each model deployed as
its int8 ONNX graph (its own int8 dev score, onnxruntime at batch 32) against the unpruned
model's int8 graph: the baseline a user gets without glp. The speed-ups against PyTorch
eager stay beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from glp.methods import EQUAL_TRAINING, REFERENCE, target_size
from glp.report.format import markdown_table, score, write_atomic, write_text
from glp.report.pick import INT8, Model, deployments

BUCKETS = (1.5, 2.0, 3.0, 6.0)
"""Speed-up buckets of the table: the best model at least this much faster."""
DEPLOYED = (("torch b1", "latency_b1_ms"), ("torch b32", None), ("onnx b1", "onnx_b1_ms"),
            ("onnx b32", "onnx_b32_ms"), ("int8 b1", "int8_b1_ms"),
            ("int8 b32", "int8_b32_ms"))
"""The latency columns of the table (``torch b32`` is the model's ``latency_ms``)."""


def method_of(model: Model) -> str:
    """The display method: the composition or method, a layer strategy by its name (and a
    distilled or cheaper-search variant after it)."""
    if model.strategy in (REFERENCE, EQUAL_TRAINING):
        return model.strategy
    if model.method in ("layers", REFERENCE) or model.method == model.strategy:
        base = model.strategy
        if model.variant and model.method in ("layers", REFERENCE):
            if model.strategy != "random":
                base = f"{base} ({model.variant})"
            elif model.variant.endswith("-kd"):
                base = f"{base} (kd)"
        return base
    return model.method


def size_of(model: Model) -> str:
    """What was asked of the model: its layers, density or ratio (with layers if fewer)."""
    target = target_size(model.extra)
    layers = f"{model.depth} layers"
    if target:
        return f"{target[0]} {target[1]:g}" + (f", {layers}" if "+" in model.method else "")
    return layers


def latency(model: Model, runtime: str) -> float | None:
    column = dict(DEPLOYED)[runtime]
    value = model.latency_ms if column is None else model.extra.get(column)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def speedups(models: Sequence[Model], runtime: str = "torch b32",
             against: str | None = None) -> dict[int, float | None]:
    """Each model's speed-up (by index): the unpruned model's latency in ``against`` (the
    same runtime by default) over the model's in ``runtime``."""
    reference = next((m for m in models if m.strategy == REFERENCE), None)
    base = latency(reference, against or runtime) if reference else None
    out = {}
    for i, m in enumerate(models):
        mine = latency(m, runtime)
        out[i] = base / mine if base and mine else None
    return out


def frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """The indices of the Pareto-optimal points: no other point is at most as costly
    (x) and at least as good (y) with one of the two strictly. Sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    kept, best = [], -math.inf
    for i in order:
        x, y = points[i]
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        if y > best:
            kept.append(i)
            best = y
    return kept


def buckets(models: Sequence[Model], thresholds: Iterable[float] = BUCKETS,
            runtime: str = "torch b32") -> list[dict]:
    """For each speed-up threshold: the model with the best mean metric among those at
    least that much faster than the unpruned one (None if none is), and the runner-up."""
    fast = speedups(models, runtime)
    rows = []
    for threshold in thresholds:
        meeting = sorted((i for i, s in fast.items() if s is not None and s >= threshold
                          and models[i].strategy not in (REFERENCE, EQUAL_TRAINING)),
                         key=lambda i: (-models[i].mean, -fast[i]))
        rows.append({"threshold": threshold,
                     "best": models[meeting[0]] if meeting else None,
                     "speedup": fast[meeting[0]] if meeting else None,
                     "runner_up": models[meeting[1]] if len(meeting) > 1 else None,
                     "runner_up_speedup": fast[meeting[1]] if len(meeting) > 1 else None,
                     "candidates": len(meeting)})
    return rows


def _pm(model: Model) -> str:
    return score(model.mean, model.std, model.seeds, counted=True)


def _clearly_better(a: Model, b: Model) -> bool:
    """A lead larger than both spreads together (a plain rule, not a test)."""
    return a.mean - b.mean > a.std + b.std


def _epochs(model: Model) -> float | None:
    value = model.extra.get("train_epochs")
    return value if isinstance(value, int | float) and value == value else None


def equal_reference(model: Model, models: Sequence[Model]) -> Model | None:
    """The unpruned model to hold ``model`` against: of the reference and the unpruned
    model trained as long as the longest method (:data:`EQUAL_TRAINING`), the one whose
    whole training is closest to ``model``'s (the reference when training is unknown)."""
    unpruned = [m for m in models if m.strategy in (REFERENCE, EQUAL_TRAINING)]
    reference = next((m for m in unpruned if m.strategy == REFERENCE), None)
    mine = _epochs(model)
    known = [m for m in unpruned if _epochs(m) is not None]
    if mine is None or not known:
        return reference
    return min(known, key=lambda m: (abs(_epochs(m) - mine), m.strategy != REFERENCE))


def _training(model: Model) -> str:
    epochs, steps = _epochs(model), model.extra.get("train_steps")
    if epochs is None:
        return "—"
    return f"{epochs:.3g} / {int(steps):,}" if isinstance(steps, int | float) else f"{epochs:.3g}"


def _n_epochs(value: float) -> str:
    return f"{value:.3g} epoch" + ("" if value == 1 else "s")


def _against(best: Model, unpruned: Model) -> str:
    """``best`` against the unpruned model, saying when their training differs."""
    gap = best.mean - unpruned.mean
    mine, theirs = _epochs(best), _epochs(unpruned)
    trained = ("" if mine is None or theirs is None
               else " trained as long" if abs(mine - theirs) < 1e-6
               else f" trained {_n_epochs(theirs)} in all against its {mine:.3g}")
    text = (f", {abs(gap):.4f} {'below' if gap < 0 else 'above'} the unpruned model{trained} "
            f"({_pm(unpruned)})")
    if mine is not None and theirs is not None and mine > theirs + 1e-6 and gap > 0:
        text += " — not an equal budget: the lead may be the extra training"
    return text


def sentences(models: Sequence[Model], metric: str) -> list[str]:
    """Which method wins where, in words, with the seed spread; each winner against the
    unpruned model trained as long as it was (teacher included), where there is one."""
    lines = []
    for bucket in buckets(models):
        best, threshold = bucket["best"], bucket["threshold"]
        if best is None:
            lines.append(f"At ≥{threshold:g}× no model is that fast.")
            continue
        text = (f"At ≥{threshold:g}×: **{method_of(best)}** ({size_of(best)}, "
                f"{bucket['speedup']:.2f}×) with {metric} {_pm(best)}")
        unpruned = equal_reference(best, models)
        if unpruned is not None and unpruned is not best:
            text += _against(best, unpruned)
        runner = bucket["runner_up"]
        if runner is not None:
            verdict = ("clearly ahead of" if _clearly_better(best, runner)
                       else "within the seed spread of")
            text += (f"; {verdict} {method_of(runner)} ({size_of(runner)}, "
                     f"{bucket['runner_up_speedup']:.2f}×, {_pm(runner)})")
        lines.append(text + ".")
    return lines


def headline(models: Sequence[Model]) -> list[Model]:
    """The models as deployed in int8: each one's int8 graph, with its own int8 dev score
    and its onnxruntime latency at batch 32 as ``latency_ms`` (speed-ups against the
    unpruned int8 graph); empty when the unpruned model's int8 graph was not timed and
    scored."""
    found = deployments(list(models), 32, (INT8,))
    if not any(m.strategy == REFERENCE and m.latency_ms for m in found):
        return []
    return [m for m in found if m.latency_ms]


def int8_costs(models: Sequence[Model]) -> list[str]:
    """A sentence for each model whose int8 graph scores lower than its fp32 model by more
    than the seed spread (the larger of the fp32 and int8 scores' sample stds, the rule of
    the layer report's greedy-against-top comparison, ``glp.report.tables``; with one seed
    there is no spread, and the largest cost is said as such)."""
    scored = [m for m in models if m.int8_mean is not None]
    if not scored:
        return []
    lines = []
    for m in sorted(scored, key=lambda m: m.int8_mean - m.mean):
        cost = m.mean - m.int8_mean
        if m.seeds > 1 and cost > max(m.std, m.int8_std or 0.0):
            lines.append(f"int8 costs **{method_of(m)}** ({size_of(m)}) {cost:.4f}: "
                         f"{score(m.int8_mean, m.int8_std, m.seeds)} against fp32 {_pm(m)}, "
                         "more than the seed spread.")
    if not lines:
        worst = min(scored, key=lambda m: m.int8_mean - m.mean)
        change = worst.int8_mean - worst.mean
        spread = ("within its seed spread" if worst.seeds > 1 else
                  "one seed, so no spread to hold it against")
        lines.append(f"int8 costs no model more than its seed spread; the largest change is "
                     f"{method_of(worst)} ({size_of(worst)}), {change:+.4f} in int8 "
                     f"({spread}).")
    return lines


def table(models: Sequence[Model], metric: str) -> list[list[str]]:
    """One row per model, fastest (PyTorch, batch 32) first, with every measurement."""
    fast = speedups(models)
    deployed = speedups(models, "int8 b1", against="torch b1")
    int8 = {i: speedups(models, f"int8 b{b}") for i, b in enumerate((1, 32))}
    order = sorted(range(len(models)), key=lambda i: (latency(models[i], "torch b32")
                                                      or math.inf, -models[i].mean))
    rows = []
    for i in order:
        m = models[i]
        stored = m.extra.get("stored_bytes")
        density = m.extra.get("encoder_density")
        rows.append([method_of(m), size_of(m), score(m.mean, m.std, m.seeds),
                     "—" if m.int8_mean is None else score(m.int8_mean, m.int8_std, m.seeds),
                     str(m.seeds), f"{m.parameters:,}" if m.parameters else "—",
                     f"{density:.3f}" if isinstance(density, float) else "—",
                     f"{stored / 1e6:.1f}" if isinstance(stored, int | float) else "—",
                     *[_ms(latency(m, name)) for name, _ in DEPLOYED],
                     _x(int8[1][i]), _x(int8[0][i]), _x(fast[i]), _x(deployed[i]),
                     _training(m)])
    return rows


TABLE_HEADER = ("method", "size", "dev {metric}", "dev {metric} int8", "seeds", "parameters",
                "encoder density", "stored MB", *(f"{name} ms" for name, _ in DEPLOYED),
                "speed-up (int8 b32 vs unpruned int8 b32)",
                "speed-up (int8 b1 vs unpruned int8 b1)", "speed-up (torch b32)",
                "deployed speed-up (int8 b1 vs torch b1)",
                "training (epochs / steps, teacher included)")


def _where(model: Model, home: Path | str | None) -> str:
    """The model's registry URI, or its directory (relative to the run home, under it)."""
    uri = model.uri
    if not uri:
        return "—"
    if home is not None and not uri.startswith("models:/"):
        try:
            return f"`{Path(uri).relative_to(Path(home))}` (in the run home)"
        except ValueError:
            pass
    return f"`{uri}`"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return markdown_table(header, rows, align=["---"] * len(header))


def plot_pareto(models: Sequence[Model], path: Path, *, metric: str, x: str, title: str) -> Path:
    """The dev metric (± std) against ``x`` (``latency``: PyTorch batch 32 ms, or
    ``parameters``), every method in its colour, the frontier as a step line with its
    members ringed."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.5, 5.0))
    ax = figure.add_subplot()
    value = (lambda m: latency(m, "torch b32")) if x == "latency" else (
        lambda m: float(m.parameters) if m.parameters else None)
    shown = [m for m in models if value(m) is not None]
    methods = list(dict.fromkeys(method_of(m) for m in shown))
    palette = colormaps["tab10"].colors
    markers = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
    for index, method in enumerate(methods):
        mine = sorted((m for m in shown if method_of(m) == method), key=value)
        style = ({"color": "black", "marker": "*", "markersize": 14}
                 if method == REFERENCE else
                 {"color": "grey", "marker": "*", "markersize": 12}
                 if method == EQUAL_TRAINING else
                 {"color": palette[index % len(palette)], "marker": markers[index % len(markers)],
                  "markersize": 6})
        ax.errorbar([value(m) for m in mine], [m.mean for m in mine],
                    yerr=[m.std for m in mine], linestyle="none", capsize=3, label=method,
                    **style)
    best = [shown[i] for i in frontier([(value(m), m.mean) for m in shown])]
    if best:
        ax.step([value(m) for m in best], [m.mean for m in best], where="post",
                color="grey", linewidth=1, linestyle=":", label="Pareto frontier")
        ax.scatter([value(m) for m in best], [m.mean for m in best], s=160,
                   facecolors="none", edgecolors="grey", linewidths=1.2)
    if not shown:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    ax.set_xlabel("median CPU latency, PyTorch, batch 32 (ms)" if x == "latency"
                  else "parameters")
    ax.set_ylabel(f"dev {metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    return write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=120))


def write_methods_report(folder: Path | str, models: Sequence[Model], metric: str,
                         costs: Mapping[str, Mapping[str, Any]] | None = None,
                         subject: str = "", home: Path | str | None = None,
                         command: str | None = None) -> dict[str, Path]:
    """``methods.md``, ``methods.csv`` and the two Pareto plots in ``folder``; their paths
    (keys ``methods``, ``methods_csv``, ``pareto_latency``, ``pareto_parameters``).
    ``command``, when given, is quoted under the title. Each file is written under a
    temporary name and renamed, the markdown last."""
    import csv
    import io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = [h.format(metric=metric) for h in TABLE_HEADER]
    rows = table(models, metric)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    paths = {"methods_csv": write_text(folder / "methods.csv", buffer.getvalue())}
    suffix = f" — {subject}" if subject else ""
    paths["pareto_latency"] = plot_pareto(models, folder / "pareto_latency.png", metric=metric,
                                          x="latency", title=f"{metric} vs latency{suffix}")
    paths["pareto_parameters"] = plot_pareto(models, folder / "pareto_parameters.png",
                                             metric=metric, x="parameters",
                                             title=f"{metric} vs parameters{suffix}")
    lines = [f"# Every method{suffix}", "",
             *([f"Made by `{command}`.", ""] if command else []),
             "![metric vs latency](pareto_latency.png)", "",
             "![metric vs parameters](pareto_parameters.png)", "",
             "## Which method wins where, deployed in int8", ""]
    int8 = headline(models)
    if int8:
        lines += ["Each model as its int8 ONNX graph, the way it deploys: speed-ups are "
                  "onnxruntime at batch 32 on this CPU against the unpruned model's int8 graph "
                  f"timed beside it, and the scores are the int8 graphs' own dev {metric}. "
                  "The best model of a bucket has the best mean; \"clearly ahead\" means its "
                  "lead is larger than both seed spreads added, \"within the seed spread\" "
                  "that it is not.", ""]
        lines += [f"- {s}" for s in sentences(int8, metric)]
    else:
        lines += ["No int8 graphs were timed and scored for the unpruned model in this run "
                  "(glp compare --methods does both), so there is no int8 headline.", ""]
    lines += ["", "## Against PyTorch eager", "",
              "The same question in PyTorch at batch 32 (fp32 scores), against the unpruned "
              "model timed beside it.", ""]
    lines += [f"- {s}" for s in sentences(models, metric)]
    lines += ["", "## What int8 costs", ""]
    lines += [f"- {s}" for s in int8_costs(models)] or ["No model was scored in int8."]
    lines += ["", "## The best model of each speed-up bucket (int8, batch 32)"
              if int8 else "## The best model of each speed-up bucket (PyTorch, batch 32)", ""]
    bucket_rows = []
    for b in buckets(int8 or models):
        m = b["best"]
        bucket_rows.append([f"≥{b['threshold']:g}×", *(
            [method_of(m), size_of(m), _pm(m), _x(b["speedup"]), _where(m, home)]
            if m else ["none", "", "", "", ""])])
    lines += _markdown_table(("speed-up", "method", "size", f"dev {metric}", "speed-up",
                              "model"), bucket_rows)
    lines += ["", "## Every model", ""]
    lines += _markdown_table(header, rows)
    if costs:
        lines += ["", "## What each method cost", "",
                  "Compute time of its final fine-tunes and compressions (and a layer "
                  "strategy's search) as measured when each was computed, shared cached work "
                  "counted for each method that uses it; equivalents: that time over the "
                  "unpruned model's fine-tune. A composition counts what it was built on: "
                  "greedy's search and its finals at the depth it starts from, and each "
                  "earlier compression step at the size it passed on. Not counted: the "
                  "teacher's fine-tune (the unpruned model's own).", ""]
        lines += _markdown_table(("method", "seconds", "fine-tune equivalents"), [
            [name, f"{c['seconds']:.0f}", f"{c['equivalents']:.2f}"] for name, c in costs.items()])
    paths["methods"] = write_text(folder / "methods.md", "\n".join(lines) + "\n")
    return paths
