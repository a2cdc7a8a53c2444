"""The ``compress`` flow: one registered method (``glp compress --method``) on one model and
task, at one or more sizes, with the same final protocol, MLflow runs, registry and Parquet
as ``prune``. Every method goes through the same path; none is named here.

The model to compress (:mod:`flows.sources`): ``--model`` as it is when it is fine-tuned
for a task (a directory or ``models:/NAME@alias``), else its fine-tune on the task (the
``fine-tune-final`` task of ``glp prune``'s reference row); ``--prune-layers K`` first
removes K layers by greedy layer pruning. It is also the teacher of a method that distils.
Then per size and seed the ``compress-model`` task (:mod:`tasks.methods`), and
``evaluate-final`` on the dev set (the report) and the selection split (which chooses the
registered seed and ``best``). Every model is saved with its plan and registered as ONNX
with the size's alias (``density-30``, ``ratio-4``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field, model_validator

from flows.job import Job, _finite
from flows.params import PruneParams
from flows.registration import register_version
from flows.runners import run_on_task_runner
from flows.sources import input_checkpoint, is_fine_tuned, registry_name, resolve_model
from glp import GlpError
from glp.core.checkpoint import read_plan, stored_bytes
from glp.core.plan import Plan, density_of
from glp.methods import (
    BUDGET_FIELDS,
    FROM_PRETRAINED,
    REFERENCE,
    Method,
    budget_label,
    compressor_options,
    get_method,
    trained_on_task,
)
from tasks.methods import (
    Compressed,
    MethodRequest,
    compress_model,
    method_fingerprint,
    not_evaluated,
)
from tasks.records import final_row, written
from tasks.registry import Registration, register_all, registrations
from tasks.tracking import FINAL, log_child_run
from tasks.training import Checkpoint


def option_names() -> dict[str, list[str]]:
    """Every compressor's parameters by option name: the methods that take each."""
    return {option: [method.name for method, _ in users]
            for option, users in compressor_options().items()}


class CompressParams(PruneParams):
    """``prune``'s model, data and budget options, plus the method, its sizes and options."""

    method: str = Field("mlpruning", description="the compression method (glp.methods)")
    densities: tuple[float, ...] | None = Field(None, min_length=1, description=(
        "a width method's sizes: fractions of the encoder weights to keep [default: the "
        "method's]"))
    ratios: tuple[float, ...] | None = Field(None, min_length=1, description=(
        "an offline method's sizes: compression ratios [default: the method's]"))
    constraints: tuple[float, ...] | None = Field(None, min_length=1, description=(
        "a constrained method's sizes: fractions of the encoder's multiply-accumulates to "
        "keep [default: the method's]"))
    options: dict[str, Any] = Field(default_factory=dict, description=(
        "the method's own parameters by option name, e.g. {\"ema\": 0.99} for grain"))
    seeds: int = Field(1, ge=1, description="seeds per compressed model (40, 41, ...)")
    prune_layers: int = Field(0, ge=0, description=(
        "remove this many layers by greedy layer pruning first, then compress that model"))
    source_model: str | None = None  # what --model named (a registry URI), when resolved

    @model_validator(mode="before")
    @classmethod
    def _method_options(cls, values):
        """A method's option given at the top level (``{"ema": 0.99}``) joins ``options``."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        known = set(option_names())
        given = {k: values.pop(k) for k in list(values) if k in known and k not in
                 cls.model_fields}
        if given:
            values["options"] = {**dict(values.get("options") or {}), **given}
        return values


class CompressSummary(BaseModel):
    job_id: str
    parent_run_id: str
    method: str
    task: str
    metric: str
    num_layers: int
    finals: list[dict]
    registered_model: str | None
    versions: dict[str, str]
    computed: int
    reused: int
    seconds: float
    home: str
    tracking_uri: str


def method_params(method: Method, sizes: tuple[float, ...] | None,
                  options: dict[str, Any]) -> list:
    """The method's parameters at each size (its default size when none is given)."""
    taken = method.options()
    for option in options:
        if option not in taken:
            users = option_names().get(option, [])
            owner = f"an option of {' and '.join(users)}" if users else "not an option"
            raise GlpError(f"--{option.replace('_', '-')} is {owner}; --method {method.name} "
                           f"does not use it")
    chosen = [method.make_params(options)] if sizes is None else [
        method.make_params(options, **{method.budget: size}) for size in sizes]
    labels = [method.label(p) for p in chosen]
    for label in labels:
        clash = [getattr(p, method.budget) for p, other in zip(chosen, labels, strict=True)
                 if other == label]
        if len(clash) > 1:
            raise GlpError(f"--{method.budget} {' and '.join(f'{c:g}' for c in clash)}: each "
                           f"size gets its own registry alias, here both {label}; give sizes "
                           "that differ")
    return chosen


def check_method(params: CompressParams) -> tuple[Method, list]:
    """The method and its parameters per size, or a GlpError naming the option."""
    method = get_method(params.method, ("width", "offline"))
    for budget, field in BUDGET_FIELDS.items():
        if budget != method.budget and getattr(params, field) is not None:
            raise GlpError(f"--{budget} does not size {method.name}; it is sized by "
                           f"--{method.budget}")
    sizes = getattr(params, BUDGET_FIELDS[method.budget])
    return method, method_params(method, sizes, params.options)


def check_on_model(method: Method, configs: list, model_path: str) -> None:
    """Every size checked against the model's shapes (on the meta device), before any run."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from glp.core.checkpoint import read_plan
    from glp.core.surgery import apply_plan

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.from_pretrained(model_path))
    plan = read_plan(model_path)
    if plan is not None and not plan.is_layers_only:  # a compressed input: its widths
        apply_plan(model, plan, factor=None)
    if plan is not None:
        model.glp_plan = plan
    for config in configs:
        method.check_model(model, config)


def preflight(params: CompressParams) -> str:
    """Check every input before anything runs; a one-line description of the job."""
    from flows.params import check_inputs

    method, configs = check_method(params)
    uri = params.model and params.model.startswith("models:/")
    if uri:
        from flows.sources import check_registered

        check_registered(params.model, params.home, params.tracking_uri)
    num_layers, data, notes = check_inputs(params.model_copy(update={"model": None}) if uri
                                    else params, [])
    what = params.model or "the embedded default"
    if not uri:
        from glp.core.models import resolve_model

        check_on_model(method, configs, resolve_model(params.model))
    sizes = ", ".join(f"{getattr(c, method.budget):g}" for c in configs)
    first = (f", after greedy pruning of {params.prune_layers} layers"
             if params.prune_layers else "")
    return (f"{method.name}: compress {what}{first} to {method.budget} {sizes} "
            f"({method.family}) on {data.spec.name} ({len(data.train):,} train / "
            f"{len(data.dev):,} dev rows, selection by {data.spec.metric})"
            + notes)


@flow(name="glp-compress", task_runner=ThreadPoolTaskRunner(max_workers=1))
def compress(params: CompressParams) -> CompressSummary:
    """One compression method on one model and task, end to end (see the module docstring).

    ``params.task_runner`` picks where the compressions run (flows/runners.py)."""
    return run_on_task_runner(_compress, params, "glp-compress")


INPUT = "input"
"""The strategy of the row that scores the model given to compress, as it came."""


def job_source(job: Job) -> tuple[Callable[[], Checkpoint], Callable[[], list[dict]]]:
    """The model to compress (and teach from), and its reference rows, both computed once
    the job's MLflow run exists: the input as it is when it is fine-tuned (scored like a
    final model), else the unpruned model's fine-tune (the reference row of seed 40; a
    diverged one is refused)."""
    if is_fine_tuned(job.model_path):
        source = input_checkpoint(job.model_path, job.model_fp, job.device)
        return (lambda: source), (lambda: [input_row(job, source)])
    return job.teacher_checkpoint, lambda: job.finals([(REFERENCE, "", job.num_layers, ())])


def input_row(job: Job, checkpoint: Checkpoint) -> dict:
    """The input model's finals row: scored on the dev and selection splits as it came."""
    evaluation, selection = (
        job._evaluate_final.submit(checkpoint, job.data, split, job.finetune, job.home,
                                   job.device).result() for split in ("dev", "selection"))
    plan = read_plan(checkpoint.path) or Plan.layers(
        len(checkpoint.kept) + len(checkpoint.removed), checkpoint.removed)
    return _row(job, None, None, "", Compressed(checkpoint=checkpoint, plan=plan.to_json(),
                                                 phases=[]), evaluation, selection, INPUT)


def _compress(params: CompressParams) -> CompressSummary:
    started = time.perf_counter()
    method, configs = check_method(params)
    params = resolve_model(params)
    job = Job(params, [])
    check_on_model(method, configs, job.model_path)
    source_of, reference_of = job_source(job)
    data = job.data
    # The method's code is in the job id: a changed method is a new job, with new
    # registered versions, not a rewrite of the old ones.
    job_id = job.identity("compress", method.name, [c.__dict__ for c in configs],
                          method_fingerprint(method), is_fine_tuned(job.model_path))
    name = params.registered_model or registry_name(params, data.task, method, configs[0])
    job.start(job_id, f"{method.name}-{job.slug}-{data.task}",
              tags={"glp.method": method.name, "glp.strategy": method.name})
    try:
        reference = reference_of()
        source = source_of()
        rows = compressed_rows(job, method, configs, source,
                               trained=training_of(reference, source))
        job.time_budgets(source, reference, rows, f"target_{method.budget}")
        versions = register_sizes(job, name, rows, method) if params.register_models else {}
        job.write_finals(reference + rows)
        seconds = round(time.perf_counter() - started, 1)
        job.finish(metrics={"compressions_computed": job.counts["computed"],
                            "compressions_reused": job.counts["reused"], "seconds": seconds})
    except BaseException as exc:
        job.abort(exc)
        raise
    return CompressSummary(
        job_id=job_id, parent_run_id=job.parent_run_id, method=method.name, task=data.task,
        metric=data.metric, num_layers=job.num_layers,
        finals=[written(r) for r in reference + rows],
        registered_model=name if versions else None, versions=versions,
        computed=job.counts["computed"], reused=job.counts["reused"], seconds=seconds,
        home=str(job.home.root), tracking_uri=job.tracking_uri)


def training_of(rows: list[dict], checkpoint: Checkpoint) -> tuple[float, int] | None:
    """The whole training (epochs, optimizer steps) of the model ``checkpoint`` holds, from
    its row among ``rows``; None when it is not known (a model given fine-tuned)."""
    for row in rows:
        if row.get("cache_key") == checkpoint.key and row.get("train_epochs") is not None:
            return row["train_epochs"], row["train_steps"]
    return None


def compressed_rows(job: Job, method: Method, configs: list, source: Checkpoint,
                    name: str | None = None,
                    trained: tuple[float, int] | None = None) -> list[dict]:
    """Every (size, seed) of one method from ``source``: compressed, evaluated on the dev
    and selection splits, logged; one finals row each (``name``: the rows' method).
    ``trained``: the source's whole training (epochs, steps), which each row's adds to its
    own (None: unknown, and so are the rows')."""
    import dataclasses

    task = compress_model.with_options(result_storage=job.home.results)
    seeds = job.seeds[:1] if method.deterministic else job.seeds
    handle = job.reporter.begin("finals", "compressed models", len(configs) * len(seeds))
    futures = {}
    for config in configs:
        for seed in seeds:
            request = MethodRequest(source=source, data=job.data, config=job.finetune,
                                    method=method.name, params=dataclasses.asdict(config),
                                    seed=seed, home=job.home, device=job.device)
            futures[method.label(config), seed] = (config, task.submit(request))
    rows = []
    for count, ((variant, _seed), (config, future)) in enumerate(futures.items()):
        compressed: Compressed = future.result()
        checkpoint = compressed.checkpoint
        job._count(checkpoint)
        if checkpoint.diverged or checkpoint.path is None:  # nothing to evaluate: NaN scores
            evaluation, selection = (not_evaluated(checkpoint, job.data, split)
                                     for split in ("dev", "selection"))
        else:
            evaluation, selection = (
                job._evaluate_final.submit(checkpoint, job.data, split, job.finetune,
                                           job.home, job.device).result()
                for split in ("dev", "selection"))
        rows.append(_row(job, method, config, variant, compressed, evaluation, selection,
                         name or method.name, trained))
        job.reporter.update(handle, count + 1)
    job.reporter.end(handle)
    job.score_int8(rows)
    return rows


def _row(job: Job, method: Method | None, config, variant: str, compressed: Compressed, evaluation,
         selection, name: str, trained: tuple[float, int] | None = None) -> dict:
    checkpoint, plan = compressed.checkpoint, compressed.plan_object
    diverged = checkpoint.diverged or evaluation.diverged or selection.diverged
    counts = plan.parameter_counts(job.base_config)
    encoder_density = density_of(counts)
    parameters = counts["parameters"] - counts["zeroed"]  # non-zero, as in Parquet
    budget = method.budget if method else None
    size = getattr(config, budget) if budget else None
    stored = stored_bytes(checkpoint.path) if checkpoint.path else None
    modules = getattr(config, "modules", None)
    own = trained_on_task(compressed.phases, job.data.sizes["train"])
    # a method trains on the task when a phase says so (the autoencoder with
    # --ae-finetune-epochs 0 and post-training read the training split but train nothing)
    seconds = "fine_tune_seconds" if own[1] else "compress_seconds"
    run_id = log_child_run(
        job.tracking_uri, job.parent_run_id, job.job_id, FINAL, checkpoint.key,
        f"{name}-{variant}-seed{checkpoint.seed}" if method else name,
        params={**({budget: size} if budget else {}), "seed": checkpoint.seed,
                "device": checkpoint.device, "plan_kind": plan.kind, **compressed.details,
                **({"modules": ",".join(modules)} if modules else {})},
        metrics={**_finite(evaluation.metrics),
                 **{f"selection_{k}": v for k, v in _finite(selection.metrics).items()},
                 "parameters": parameters, "encoder_density": encoder_density,
                 seconds: checkpoint.seconds, **({"stored_bytes": stored} if stored else {})},
        tags={**job.common_tags, **({f"glp.{budget}": f"{size:g}"} if budget else {}),
              "glp.diverged": str(diverged).lower(), "glp.plan_key": plan.key},
        texts={"plan.json": plan.to_json()})
    if compressed.details.get(FROM_PRETRAINED):  # the source's training is not in it
        trained = (0.0, 0)
    training = ({"train_epochs": round(trained[0] + own[0], 4),
                 "train_steps": trained[1] + own[1]} if trained else {})
    who = {"job_id": job.job_id, "strategy": name, "variant": variant,
           "model": getattr(job.params, "source_model", None) or job.params.model,
           "task": job.data.task, "method": name}
    return final_row(
        who, run_id=run_id, parent_run_id=job.parent_run_id, checkpoint=checkpoint,
        evaluation=evaluation, selection=selection, diverged=diverged, plan=plan,
        parameters=parameters, encoder_density=encoder_density,
        train_examples=job.data.sizes["train"], reused=checkpoint.flow_run_id != job.flow_run_id,
        stored_bytes=stored, **({f"target_{budget}": size} if budget else {}), **training,
        _trained_on_task=bool(own[1]))


def register_sizes(job: Job, name: str, rows: list[dict], method: Method) -> dict[str, str]:
    """One ONNX version per size (aliases ``density-30`` / ``ratio-4`` and ``best``), by the
    rule of :mod:`tasks.registry`: chosen by the selection split, never diverged."""
    column = f"target_{method.budget}"

    def size_of(row: dict) -> float | None:
        return row.get(column)

    def register(registration: Registration, int8: bool) -> str:
        chosen = registration.chosen
        trained = "fine-tuned" if chosen.get("_trained_on_task") else "not fine-tuned"
        model = getattr(job.params, "source_model", None) or job.params.model
        return register_version(
            job, name, registration, int8, chosen["model_dir"],
            tags={"glp.method": chosen["method"],
                  f"glp.{method.budget}": f"{registration.group:g}",
                  "glp.encoder_density": f"{chosen['encoder_density']:.4f}",
                  "glp.parameters": str(chosen["parameters"]),
                  "glp.stored_bytes": str(chosen.get("stored_bytes")),
                  "glp.plan_key": Plan.from_json(chosen["plan"]).key},
            description=(f"{model} compressed by {chosen['method']} ({chosen['variant']}; "
                         f"its last step {trained}) on {job.data.task}; dev "
                         f"{job.data.metric} {chosen['value']:.4f} (seed {chosen['seed']}, "
                         "chosen by the selection split)"))

    plan = registrations(rows, size_of, lambda size: budget_label(method.budget, size))
    return register_all(job.tracking_uri, name, plan, register, rows, size_of)
