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

from flows.job import (
    Job,
    PruneParams,
    check_inputs,
    check_search,
    distilled_variant,
    final_plans,
    register_depths,
    strategy_for,
)
from flows.methods import compressors, layer_strategies, parse_methods, run_chain
from flows.runners import run_on_task_runner
from glp import GlpError
from glp.core.provenance import code_fingerprint
from glp.methods.layers.search import STRATEGIES, Strategy
from glp.methods.names import LAYER_METHOD, OFFLINE_METHODS, REFERENCE, WIDTH_METHODS
from glp.report.tables import label, write_report
from tasks.compression import CODE as COMPRESSION_CODE
from tasks.offline import CODE as OFFLINE_CODE
from tasks.records import written
from tasks.tracking import end_job_run, log_report

ALL_STRATEGIES = tuple(STRATEGIES)


class CompareParams(PruneParams):
    """``prune``'s parameters plus which strategies (or methods) to compare (``strategy``
    is unused)."""

    strategies: tuple[str, ...] = Field(ALL_STRATEGIES, description="strategies to compare")
    methods: tuple[str, ...] = Field((), description=(
        "methods to compare instead of --strategies: layer strategies, mlpruning, grain, "
        "lowrank, autoencoder and compositions such as greedy+lowrank (flows/methods.py)"))
    densities: tuple[float, ...] = Field((0.5, 0.3), min_length=1, description=(
        "width methods: fractions of the encoder weights to keep"))
    ratios: tuple[float, ...] = Field((2.0, 4.0), min_length=1, description=(
        "offline methods: compression ratios of the compressed module types"))
    pruning_epochs: tuple[str, ...] = Field((), description=(
        "width methods' epochs of training while pruning: EPOCHS for every width method "
        "or METHOD=EPOCHS, e.g. grain=3 (unset: mlpruning 2, grain 20)"))
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
    num_layers, data = check_inputs(params, strategies)
    if params.methods:
        from glp.core.models import resolve_model

        check_compressors(params, resolve_model(params.model))
        names = ", ".join(parse_methods(params.methods))
        trained = "".join(f" ({m}: {e:g} pruning epochs)"
                          for m, e in pruning_epochs(params).items())
        return (f"compare {names}: remove 1..{params.remove} of {num_layers} layers, keep "
                f"{', '.join(f'{d:g}' for d in params.densities)} in width{trained}, ratio "
                f"{', '.join(f'{r:g}' for r in params.ratios)} offline, of {params.model} on "
                f"{data.spec.name} ({len(data.train):,} train / {len(data.dev):,} dev rows, "
                f"{data.spec.metric}, {params.seeds} seed(s))")
    names = ", ".join(dict.fromkeys(s.name for s in strategies))
    return (f"compare {names}: remove 1..{params.remove} of {num_layers} layers of "
            f"{params.model} on {data.spec.name} ({len(data.train):,} train / "
            f"{len(data.dev):,} dev rows, {data.spec.metric}, {params.seeds} seed(s))")


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
    extra = ((parse_methods(params.methods), params.densities, params.ratios,
              *pruning_identity(params),
              code_fingerprint(COMPRESSION_CODE), code_fingerprint(OFFLINE_CODE))
             if params.methods else ())
    job_id = job.identity("compare", labels, params.exhaustive_limit, *extra)
    job.start(job_id, f"compare-{job.slug}-{data.task}-remove{params.remove}",
              tags={"glp.strategy": "compare", "glp.strategies": ",".join(labels)})
    methods = compressors(parse_methods(params.methods)) if params.methods else ()
    try:
        outcomes = [job.search(strategy) for strategy in strategies]
        plans_needed = final_plans(outcomes)
        if params.methods and not plans_needed:  # compressors only: the reference still
            plans_needed = [(REFERENCE, "", job.num_layers, ())]
        rows = job.finals(plans_needed, measure_latency=not params.methods)
        if params.register_models:
            _register_all(params, job, rows, outcomes)
        if params.methods:
            rows += _compressed_rows(params, job, methods, rows,
                                     register=params.register_models)
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
        layer_rows = [r for r in rows if r["method"] in (LAYER_METHOD, REFERENCE)]
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
        end_job_run(job.tracking_uri, job.parent_run_id, "FINISHED",
                    metrics={"fine_tunes_computed": job.counts["computed"],
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


def compress_params(params: CompareParams, method: str):
    """``glp compress``'s parameters for one method, with this comparison's budget."""
    from flows.compress import CompressParams

    shared = {k: v for k, v in params.model_dump().items()
              if k in PruneParams.model_fields and k not in ("distill", "distill_temperature")}
    size = ({"ratios": params.ratios} if method in OFFLINE_METHODS
            else {"densities": params.densities,
                  "pruning_epochs": pruning_epochs(params).get(method)})
    return CompressParams(**shared, method=method, **size)


def pruning_epochs(params: CompareParams) -> dict[str, float]:
    """``--pruning-epochs`` per width method of ``--methods``: ``3`` sets every one and
    ``grain=3`` one (over a bare number, whatever the order); a GlpError names a value that
    is malformed, given twice, or would be ignored."""
    steps = {s for name in parse_methods(params.methods) for s in name.split("+")}
    used = [m for m in WIDTH_METHODS if m in steps]
    given: dict[str, tuple[str, float]] = {}  # method, or "" for a bare number: (typed, epochs)
    for value in params.pruning_epochs:
        method, _, number = value.rpartition("=")
        method = method.strip().lower()
        try:
            epochs = float(number)
        except ValueError:
            epochs = float("nan")
        if not epochs > 0 or epochs == float("inf"):
            raise GlpError(f"--pruning-epochs {value!r}: expected EPOCHS > 0 or "
                           "METHOD=EPOCHS, e.g. 3 or grain=3")
        if method and method not in WIDTH_METHODS:
            raise GlpError(f"--pruning-epochs {value!r}: {method!r} is not a width method; "
                           f"choose {' or '.join(WIDTH_METHODS)}")
        if (method and method not in used) or not used:
            raise GlpError(f"--pruning-epochs {value!r} trains a width method; --methods "
                           f"{','.join(parse_methods(params.methods))} has "
                           f"{'no ' + method if method else 'none'} "
                           f"(add {method or 'mlpruning or grain'})")
        if method in given:
            raise GlpError(f"--pruning-epochs {given[method][0]!r} and {value!r}: "
                           f"{'one value per method' if method else 'one bare number'}, "
                           "please")
        given[method] = (value, epochs)
    return {m: given.get(m, given.get(""))[1] for m in used if m in given or "" in given}


def pruning_identity(params: CompareParams) -> tuple:
    """What ``--pruning-epochs`` changes, for the job id: the values that differ from the
    methods' defaults (typing a default is the same job)."""
    from glp.methods.grain import GrainConfig
    from glp.methods.mlpruning import MLPruningConfig

    default = {"mlpruning": MLPruningConfig().pruning_epochs, "grain": GrainConfig().epochs}
    changed = sorted((m, e) for m, e in pruning_epochs(params).items() if e != default[m])
    return (changed,) if changed else ()


def check_compressors(params: CompareParams, model_path: str) -> None:
    """Every compressor's budget, checked on the base model before anything runs."""
    from flows.compress import check_method
    from flows.offline import check_offline, check_sizes

    for name in compressors(parse_methods(params.methods)):
        for method in name.split("+"):
            if method == "greedy":
                continue
            values = compress_params(params, method)
            if method in OFFLINE_METHODS:
                check_sizes(model_path, values, check_offline(values))
            else:
                check_method(values, model_path)


def _compressed_rows(params: CompareParams, job: Job, methods: tuple[str, ...],
                     layer_rows: list[dict], register: bool = False) -> list[dict]:
    """Every compressor and composition, from the shared teacher (flows/methods.py); with
    ``register``, each under its own registered name (:func:`method_registry_name`), one
    ONNX version per size, as ``glp compress`` registers them."""
    from flows import compress as width
    from flows import offline

    if not methods:
        return []
    teacher = job.teacher_checkpoint()
    depth = job.num_layers - params.remove

    def greedy_rows() -> list[dict]:
        return [r for r in layer_rows if r["strategy"] == "greedy" and not r["variant"]
                and r["depth"] == depth]

    def step(method: str, source) -> list[dict]:
        values = compress_params(params, method)
        if method in OFFLINE_METHODS:
            return offline._compressed(job, values, offline.check_offline(values), source)
        return width._compressed(job, values, width.check_method(values, source.path), source)

    rows: list[dict] = []
    for name in methods:
        chain = run_chain(name, teacher, greedy_rows, step)
        if register:
            last = name.split("+")[-1]
            registrar = offline._register if last in OFFLINE_METHODS else width._register
            registrar(job, method_registry_name(job.slug, job.data.task, name, params.remove,
                                                params.densities[0]), chain)
        rows += chain
    return rows


def method_registry_name(slug: str, task: str, method: str, remove: int,
                         density: float) -> str:
    """``glp-<model>-<task>-<method>``, the name ``glp compress --method`` registers a single
    method under. A composition names its steps and the size each passed on, since the
    versions' aliases name only the last step's size: greedy by the layers it removed (as
    ``glp compress --prune-layers`` does), a width step by the density it kept (the first
    ``--density``), so ``greedy+mlpruning+lowrank`` at --remove 2 and --density 0.5 is
    ``…-greedy2-mlpruning50-lowrank``."""
    steps = method.split("+")
    named = [f"greedy{remove}" if step == "greedy" else
             f"{step}{round(density * 100):02d}" if index < len(steps) - 1 else step
             for index, step in enumerate(steps)]
    return f"glp-{slug}-{task}-{'-'.join(named)}"


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
        if row["strategy"] == REFERENCE:
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


def check_sizes_used(params: CompareParams) -> None:
    """Refuse what --methods would silently ignore: a size no chosen method uses."""
    methods = parse_methods(params.methods)
    steps = {step for name in methods for step in name.split("+")}
    given = params.model_fields_set
    if "densities" in given and not steps & set(WIDTH_METHODS):
        raise GlpError(f"--density sizes a width method; --methods {','.join(methods)} has "
                       "none (add mlpruning or grain)")
    pruning_epochs(params)
    if "ratios" in given and not steps & set(OFFLINE_METHODS):
        raise GlpError(f"--ratio sizes an offline method; --methods {','.join(methods)} has "
                       "none (add lowrank or autoencoder)")
