"""The ``compare`` flow: every layer-selection strategy on one model and task, one report.

Runs the chosen strategies with the same cached tasks as ``prune`` (a candidate or a
final model that two strategies share is fine-tuned once), then the final protocol for
every strategy and depth, measures each depth's CPU latency, and writes the finals to
Parquet (with a ``strategy`` column) and a markdown report with plots under
``<home>/reports/``, also attached to the job's MLflow run.
"""

from __future__ import annotations

import shlex
import time

import pandas as pd
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, field_validator

from flows.comparison import (
    check_compressors,
    check_sizes_used,
    compressed_method_rows,
    compressor_steps,
    describe_sizes,
    equal_training_rows,
    pruning_epochs,
    pruning_identity,
    sizes_identity,
)
from flows.job import Job, distilled_variant, final_plans
from flows.methods import compressor_names, layer_strategies, parse_methods
from flows.options import COMPARE_SIZES
from flows.params import (
    PruneParams,
    check_inputs,
    check_search,
    strategy_for,
)
from flows.registration import register_depths
from flows.runners import run_on_task_runner
from glp import GlpError
from glp.methods import EQUAL_TRAINING, LAYER_METHOD, REFERENCE, get_method
from glp.methods.layers.search import STRATEGIES, Strategy
from glp.report.tables import label, write_report
from tasks.methods import method_fingerprint
from tasks.records import written
from tasks.tracking import log_report

ALL_STRATEGIES = tuple(STRATEGIES)


class CompareParams(PruneParams):
    """``prune``'s parameters plus which strategies (or methods) to compare (``strategy``
    is unused)."""

    strategies: tuple[str, ...] = Field(ALL_STRATEGIES, description="strategies to compare")
    methods: tuple[str, ...] = Field((), description=(
        "methods to compare instead of --strategies: any registered method (layer "
        "strategies, mlpruning, grain, lowrank, autoencoder, ...) and compositions such as "
        "greedy+lowrank (flows/methods.py)"))
    densities: tuple[float, ...] = Field(COMPARE_SIZES["density"], min_length=1, description=(
        "width methods: fractions of the encoder weights to keep"))
    ratios: tuple[float, ...] = Field(COMPARE_SIZES["ratio"], min_length=1, description=(
        "offline methods: compression ratios of the compressed module types"))
    constraints: tuple[float, ...] = Field(COMPARE_SIZES["constraint"], min_length=1,
                                           description=("constrained methods: fractions of "
                                                        "the encoder's multiply-accumulates "
                                                        "to keep"))
    pruning_epochs: tuple[str, ...] = Field((), description=(
        "the epochs of training while pruning of the methods that take --pruning-epochs: "
        "EPOCHS for every one or METHOD=EPOCHS, e.g. grain=3 (unset: each method's own)"))
    random_orders: int = Field(3, ge=1, description="random orders (seeds 0, 1, ...)")
    register_models: bool = False
    command: str | None = Field(None, description="the command line, quoted in the report")

    @field_validator("pruning_epochs", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        """Accept one value (``"grain=3"``, ``3``) as well as several."""
        if value is None:
            return ()
        return (str(value),) if isinstance(value, str | int | float) else tuple(
            str(v) for v in value)

    @field_validator("strategies", "methods", mode="before")
    @classmethod
    def _split(cls, value):
        """Accept "greedy,top" as well as a list (names are checked by ``preflight``)."""
        return tuple(value.split(",")) if isinstance(value, str) else value


class CompareSummary(BaseModel):
    job_id: str
    parent_run_id: str
    task: str
    metric: str
    num_layers: int
    plans: dict[str, list[list[int]]]
    costs: dict[str, dict]
    finals: list[dict]
    report: dict[str, str]
    computed: int
    reused: int
    seconds: float
    home: str
    tracking_uri: str


def parse_strategies(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"greedy,top"`` or a list: known, unique names in the given order, or a GlpError."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise GlpError(f"no strategies given; choose from: {', '.join(ALL_STRATEGIES)}")
    for name in names:
        if name not in STRATEGIES:
            raise GlpError(f"unknown strategy '{name}'; choose from: {', '.join(ALL_STRATEGIES)}")
    return tuple(dict.fromkeys(names))


def strategies_of(params: CompareParams) -> list[Strategy]:
    """The strategy instances: random once per order seed; with a pre-filter, greedy both
    in full and pre-filtered, so the report shows what the pre-filter costs in quality."""
    chosen: list[Strategy] = []
    names = (layer_strategies(parse_methods(params.methods)) if params.methods
             else parse_strategies(params.strategies))
    for name in names:
        if name == "random":
            chosen += [strategy_for(params, name, seed=s) for s in range(params.random_orders)]
        elif name == "greedy":
            full = {"search": "full", "search_fraction": None}
            chosen.append(strategy_for(params, name, prefilter_keep=0, **full))
            if params.prefilter_keep:
                chosen.append(strategy_for(params, name, **full))
            if params.search != "full":
                chosen.append(strategy_for(params, name, prefilter_keep=0))
        else:
            chosen.append(strategy_for(params, name))
    return chosen


def preflight(params: CompareParams) -> str:
    """Check the inputs before any run starts; a one-line description of the comparison."""
    if params.registered_model:
        raise GlpError(f"--registered-model {params.registered_model}: compare registers each "
                       "strategy and method under its own name (glp-<model>-<task>-<method>); "
                       "leave it out, or name one model with glp prune or glp compress")
    if params.methods and "strategies" in params.model_fields_set:
        raise GlpError("--strategies and --methods: give one (--methods takes layer "
                       "strategies too, e.g. --methods greedy,top,mlpruning)")
    if params.methods:
        check_sizes_used(params)
        check_search(params)  # also when no layer strategy is built
    strategies = strategies_of(params)
    num_layers, data, notes = check_inputs(params, strategies)
    if params.methods:
        from glp.core.models import resolve_model

        check_compressors(params, resolve_model(params.model))
        names = ", ".join(parse_methods(params.methods))
        trained = "".join(f" ({m}: {e:g} pruning epochs)"
                          for m, e in pruning_epochs(params).items())
        sizes = describe_sizes(params)
        layers = f"remove 1..{params.remove} of {num_layers} layers"
        return (f"compare {names}: {', '.join(p for p in (layers, sizes + trained) if p)}, "
                f"of {params.model} on "
                f"{data.spec.name} ({len(data.train):,} train / {len(data.dev):,} dev rows, "
                f"{data.spec.metric}, {_seeds(params.seeds)})" + notes)
    names = ", ".join(dict.fromkeys(s.name for s in strategies))
    return (f"compare {names}: remove 1..{params.remove} of {num_layers} layers of "
            f"{params.model} on {data.spec.name} ({len(data.train):,} train / "
            f"{len(data.dev):,} dev rows, {data.spec.metric}, {_seeds(params.seeds)})"
            + notes)


def _seeds(count: int) -> str:
    return "1 seed" if count == 1 else f"{count} seeds"


@flow(name="glp-compare", task_runner=ThreadPoolTaskRunner(max_workers=1))
def compare(params: CompareParams) -> CompareSummary:
    """Greedy layer pruning against every baseline, at every depth up to ``remove``.

    ``params.task_runner`` picks where the fine-tunes run (flows/runners.py): any runner
    but ``sequential`` runs the work as a subflow, ``glp-compare-<kind>``, on that runner.
    """
    return run_on_task_runner(_compare, params, "glp-compare")


def _compare(params: CompareParams) -> CompareSummary:
    started = time.perf_counter()
    strategies = strategies_of(params)
    job = Job(params, strategies)
    data = job.data
    labels = [s.label for s in strategies]
    # With --methods, the methods, their sizes and the compression code are in the job id
    # too: another density is another job, with its own rows, MLflow run and report.
    extra = ((parse_methods(params.methods), *sizes_identity(params),
              *pruning_identity(params),
              *(method_fingerprint(get_method(m)) for m in compressor_steps(params)))
             if params.methods else ())
    job_id = job.identity("compare", labels, params.exhaustive_limit, *extra)
    job.start(job_id, f"compare-{job.slug}-{data.task}-remove{params.remove}",
              tags={"glp.strategy": "compare", "glp.strategies": ",".join(labels)})
    methods = compressor_names(parse_methods(params.methods)) if params.methods else ()
    try:
        outcomes = [job.search(strategy) for strategy in strategies]
        plans_needed = final_plans(outcomes)
        if params.methods and not plans_needed:  # compressors only: the reference still
            plans_needed = [(REFERENCE, "", job.num_layers, ())]
        rows = job.finals(plans_needed, measure_latency=not params.methods)
        if params.register_models:
            _register_all(params, job, rows, outcomes)
        if params.methods:
            rows += compressed_method_rows(params, job, methods, rows,
                                     register=params.register_models)
            rows += equal_training_rows(job, rows)
            _time_deployed(job, rows)
        job.write_finals(rows)
        plans: dict[str, list[list[int]]] = {}
        costs: dict[str, dict] = {}
        for outcome in outcomes:
            name = label(outcome.strategy.name, outcome.strategy.variant)
            shown = name if outcome.strategy.name != "random" else (
                f"random ({outcome.strategy.variant})")
            plans[shown] = [list(removed) for _, removed in outcome.plan[1:]]
            cost = costs.setdefault(name, {"fine_tunes": 0, "equivalents": 0.0,
                                           "seconds": 0.0, "zero_shot_passes": 0})
            cost["fine_tunes"] += outcome.fine_tunes
            cost["equivalents"] = round(cost["equivalents"] + outcome.equivalents, 3)
            cost["seconds"] = round(cost["seconds"] + outcome.seconds, 1)
            cost["zero_shot_passes"] += outcome.zero_shot_passes
        spent = method_costs(rows, costs) if params.methods else {}
        rows = [written(row) for row in rows]
        seconds = round(time.perf_counter() - started, 1)
        folder = job.home.reports / f"compare-{job.slug}-{data.task}-{job_id}"
        layer_rows = [r for r in rows if r["method"] in (LAYER_METHOD, REFERENCE)
                      and r["strategy"] != EQUAL_TRAINING]
        report = write_report(
            folder, pd.DataFrame(layer_rows), job.num_layers, plans, costs,
            meta=_meta(params, job, seconds),
        ) if plans else {}
        if params.methods:
            from glp.report.pareto import write_methods_report
            from glp.report.pick import models

            report |= write_methods_report(
                folder, models(rows), data.metric,
                costs=spent, subject=f"{data.task} · {params.model}",
                home=job.home.root, command=params.command)
        log_report(job.tracking_uri, job.parent_run_id, folder)
        job.finish(metrics={"fine_tunes_computed": job.counts["computed"],
                            "fine_tunes_reused": job.counts["reused"], "seconds": seconds})
    except BaseException as exc:
        job.abort(exc)
        raise
    return CompareSummary(
        job_id=job_id, parent_run_id=job.parent_run_id, task=data.task, metric=data.metric,
        num_layers=job.num_layers, plans=plans, costs=costs, finals=rows,
        report={k: str(v) for k, v in report.items()}, computed=job.counts["computed"],
        reused=job.counts["reused"], seconds=seconds, home=str(job.home.root),
        tracking_uri=job.tracking_uri,
    )


def _meta(params: CompareParams, job: Job, seconds: float) -> dict:
    command = params.command or "glp compare " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}"
        for k, v in params.model_dump(exclude={"home", "tracking_uri", "command", "strategy"},
                                      exclude_defaults=True).items())
    return {
        "model": params.model, "task": job.data.task, "metric": job.data.metric,
        "command": command, "wall_seconds": seconds,
        "settings": {
            "train examples (fit / selection / full)": (
                f"{job.data.sizes['fit']:,} / {job.data.sizes['selection']:,} / "
                f"{job.data.sizes['train']:,}"),
            "dev examples": f"{job.data.sizes['dev']:,}",
            "epochs": params.epochs, "learning rate": params.learning_rate,
            "batch size": params.batch_size, "max length": params.max_length,
            "gradient clipping (max norm)": params.max_grad_norm or "off",
            "device (training, evaluation and latency)": f"{job.device} ({params.precision})",
            "final seeds": ", ".join(map(str, job.seeds)), "search seed": params.search_seed,
            "random orders": params.random_orders,
            "greedy pre-filter": params.prefilter_keep or "off",
            "greedy search": (params.search if params.search == "full" else
                              f"full and {params.search} ({_fraction(params):g})"),
            "fine-tunes computed / reused": f"{job.counts['computed']} / "
                                            f"{job.counts['reused']}",
        },
    }


def _fraction(params: CompareParams) -> float:
    return strategy_for(params, "greedy").fraction


def _register_all(params: CompareParams, job: Job, rows: list[dict], outcomes) -> None:
    """With ``register_models``: each strategy's models under its own registered name."""
    for outcome in outcomes:
        strategy = outcome.strategy
        mine = [r for r in rows
                if r["strategy"] == strategy.name and r["variant"] == strategy.variant]
        name = f"glp-{job.slug}-{job.data.task}-{strategy.label}"
        register_depths(params, job, mine, name, outcome)
        if params.distill:
            kd = distilled_variant(strategy.variant)
            register_depths(params, job, [r for r in rows if r["strategy"] == strategy.name
                                          and r["variant"] == kd],
                            f"{name}-kd", outcome, distilled=True)


DEPLOYED_COLUMNS = {"torch b1": "latency_b1_ms", "torch b32": "latency_ms",
                    "onnx b1": "onnx_b1_ms", "onnx b32": "onnx_b32_ms",
                    "int8 b1": "int8_b1_ms", "int8 b32": "int8_b32_ms"}
"""Where each deployed latency goes in a finals row (``latency_ms``: PyTorch, batch 32)."""


def _time_deployed(job: Job, rows: list[dict]) -> None:
    """One model per plan (the first seed that did not diverge: the same plan is the same
    architecture), all timed together in PyTorch and onnxruntime (fp32, int8) at batch 1
    and 32, interleaved; every row of a plan gets its numbers."""
    from glp.core.checkpoint import stored_bytes
    from tasks.analysis import measure_deployed

    timed: dict[str, object] = {}
    for row in rows:
        if not row["diverged"] and row.get("_checkpoint") is not None:
            timed.setdefault(row["plan"], row["_checkpoint"])
    if not timed:
        return
    task = measure_deployed.with_options(result_storage=job.home.results)
    measured = task(list(dict.fromkeys(timed.values())), job.data, "dev",
                    job.finetune.max_length, job.home, "cpu")
    for row in rows:
        checkpoint = timed.get(row["plan"])
        if checkpoint is None:
            continue
        for name, column in DEPLOYED_COLUMNS.items():
            row[column] = measured.median_ms[checkpoint.key].get(name)
        row["latency_batch"] = min(32, job.data.sizes["dev"])  # latency_batch's rows
        if row.get("stored_bytes") is None and row.get("model_dir"):
            row["stored_bytes"] = stored_bytes(row["model_dir"])


def method_costs(rows: list[dict], search: dict[str, dict]) -> dict[str, dict]:
    """Per method: the compute seconds of its final models' fine-tunes and compressions
    (one seed's work counted once per plan and seed), plus a layer strategy's search, and
    that time in unpruned fine-tunes. A composition also counts what it was built on: the
    steps before its last, at the size it used (``_prior_seconds`` of its rows,
    flows/methods.py), and when it starts with greedy, greedy's search and its finals at
    the depth the composition starts from."""
    reference = [r["fine_tune_seconds"] for r in rows
                 if r["strategy"] == REFERENCE and r.get("fine_tune_seconds")]
    unit = sum(reference) / len(reference) if reference else None
    costs: dict[str, dict] = {}
    prior: dict[str, float] = {}
    for row in rows:
        if row["strategy"] in (REFERENCE, EQUAL_TRAINING):
            continue
        name = row["method"] if row["method"] != LAYER_METHOD else label(
            row["strategy"], row["variant"])
        cost = costs.setdefault(name, {"seconds": search.get(name, {}).get("seconds", 0.0)})
        cost["seconds"] += row.get("fine_tune_seconds") or 0.0
        prior.setdefault(name, row.get("_prior_seconds") or 0.0)
    greedy = [r for r in rows if r["strategy"] == "greedy" and r["method"] == LAYER_METHOD
              and not r["variant"]]
    depth = min((r["depth"] for r in greedy), default=None)  # L - --remove
    deepest = [r for r in greedy if r["depth"] == depth]
    greedy_seconds = search.get("greedy", {}).get("seconds", 0.0) + sum(
        r.get("fine_tune_seconds") or 0.0 for r in deepest)
    for name, cost in costs.items():
        if "+" in name:
            cost["seconds"] += prior[name] + (greedy_seconds if name.startswith("greedy+")
                                              else 0.0)
        cost["equivalents"] = cost["seconds"] / unit if unit else float("nan")
    return costs
