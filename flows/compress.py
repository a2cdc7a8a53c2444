"""The ``compress`` flow: width compression (MLPruning) of one model on one task, at one or
more densities, with the same final protocol, MLflow runs, registry and Parquet as ``prune``.

Tasks: the teacher is the unpruned final model (``fine-tune-final``, shared with ``glp
prune``'s reference row), then per density and seed ``prune-width`` (masked distillation
training and slicing), ``fine-tune-compressed`` (a short distillation fine-tune, and level 3
block masks if asked) and ``evaluate-final`` on the dev set (the report) and the selection
split (which chooses the registered seed and ``best``). Every model is saved with its plan
and registered as ONNX, so ``models:/NAME@density-30`` serves without glp.
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from flows.job import Job, PruneParams, _finite, check_inputs
from flows.offline import run_offline
from flows.runners import run_on_task_runner
from glp import GlpError
from glp.core.plan import Plan, density_of
from glp.core.provenance import code_fingerprint
from glp.methods import grain
from glp.methods.grain import GrainConfig
from glp.methods.mlpruning import MLPruningConfig, check_density
from glp.methods.names import OFFLINE_METHODS, REFERENCE, WIDTH_METHODS
from tasks.compression import CODE as COMPRESSION_CODE
from tasks.compression import (
    Compressed,
    CompressRequest,
    fine_tune_compressed,
    not_evaluated,
    prune_width,
)
from tasks.records import final_row, written
from tasks.registry import Registration, register_all, registrations
from tasks.tracking import FINAL, end_job_run, log_child_run, register_onnx

METHODS = {**WIDTH_METHODS, **OFFLINE_METHODS}


class CompressParams(PruneParams):
    """``prune``'s model, data and budget options, plus the method and its budget."""

    method: str = Field("mlpruning", description=", ".join(METHODS))
    densities: tuple[float, ...] = Field((0.5,), min_length=1, description=(
        "fractions of encoder weights to keep, e.g. 0.5 0.3 0.2"))
    pruning_epochs: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "epochs of training while pruning (None: mlpruning 2, grain 20)"))
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "distillation temperature (None: mlpruning 2, grain 8)"))
    final_epochs: float = Field(1.0, ge=0, allow_inf_nan=False)
    block_size: int = Field(0, ge=0, description="level 3 block width (0 = off)")
    block_density: float = Field(0.5, gt=0, le=1, allow_inf_nan=False)
    block_epochs: float = Field(1.0, gt=0, allow_inf_nan=False)
    mask_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    # grain (the reference's settings: airaria/GRAIN scripts/run_glue.sh)
    grain_start: float = Field(0.2, ge=0, lt=1, allow_inf_nan=False)
    grain_end: float = Field(0.4, ge=0, le=1, allow_inf_nan=False)
    ema: float = Field(0.998, ge=0, lt=1, allow_inf_nan=False)
    head_regulariser: float = Field(0.3, gt=0, allow_inf_nan=False)
    kd_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    hard_weight: float = Field(0.0, ge=0, allow_inf_nan=False)
    hidden_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    embedding_rank: int = Field(192, ge=0)
    seeds: int = Field(1, ge=1, description="seeds per compressed model (40, 41, ...)")
    # offline methods (lowrank, autoencoder)
    ratios: tuple[float, ...] = Field((10.0,), min_length=1, description=(
        "compression ratios of the compressed module types, e.g. 4 10 20"))
    modules: tuple[str, ...] = Field(("query", "key", "value", "output", "ffn_in", "ffn_out"),
                                     description="module types to compress")
    fisher: bool = Field(False, description="lowrank: Fisher-weighted SVD")
    decoder: str = Field("nonlinear", description="autoencoder: nonlinear or linear")
    ae_epochs: int = Field(20, ge=1)
    ae_batch_size: int = Field(16, ge=1)
    ae_eval_every: int = Field(1, ge=1)
    prune_layers: int = Field(0, ge=0, description=(
        "offline methods: remove this many layers by greedy layer pruning first"))
    source_model: str | None = None  # what --model named (a registry URI), when resolved

    def method_config(self, density: float) -> MLPruningConfig | GrainConfig:
        given = {"temperature": self.temperature} if self.temperature is not None else {}
        if self.method == "grain":
            if self.pruning_epochs is not None:
                given["epochs"] = self.pruning_epochs
            return GrainConfig(density=density, start=self.grain_start, end=self.grain_end,
                               beta=self.ema, head_alpha=self.head_regulariser,
                               kd_weight=self.kd_weight, hard_weight=self.hard_weight,
                               hidden_weight=self.hidden_weight,
                               embedding_rank=self.embedding_rank, **given)
        if self.pruning_epochs is not None:
            given["pruning_epochs"] = self.pruning_epochs
        return MLPruningConfig(density=density, final_epochs=self.final_epochs,
                               block_size=self.block_size, block_density=self.block_density,
                               block_epochs=self.block_epochs, mask_lr=self.mask_lr, **given)


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


def density_label(density: float) -> str:
    """The budget's registry alias: ``density-30`` keeps 30% of the encoder weights
    (MLflow aliases may not contain a dot)."""
    return f"density-{round(density * 100):02d}"


def check_method(params: CompressParams, model_path: str
                 ) -> list[MLPruningConfig | GrainConfig]:
    """The method's settings per density, or a GlpError naming the option."""
    if params.method not in METHODS:
        raise GlpError(f"--method {params.method!r}: choose one of {', '.join(METHODS)}")
    if params.method in OFFLINE_METHODS:
        return []
    from flows.offline import check_unused

    check_unused(params, offline=False)
    configs = [params.method_config(d) for d in params.densities]
    labels = [density_label(d) for d in params.densities]
    for label in labels:
        clash = [d for d, other in zip(params.densities, labels, strict=True) if other == label]
        if len(clash) > 1:
            raise GlpError(f"--density {' and '.join(f'{d:g}' for d in clash)}: the densities "
                           f"must differ by at least 0.01 (each gets its own registry alias, "
                           f"here both {label})")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_path)
    import torch

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    check = grain.check_density if params.method == "grain" else check_density
    for method_config in configs:
        check(model, method_config.density)
    return configs


def preflight_offline(params: CompressParams) -> str:
    from flows.offline import check_offline, check_sizes

    configs = check_offline(params)
    uri = params.model and params.model.startswith("models:/")
    if uri:  # checked when the flow downloads it (the registry is in the run home)
        what = params.model
        num_layers, data = check_inputs(params.model_copy(update={"model": None}), [])
    else:
        num_layers, data = check_inputs(params, [])
        from glp.core.models import resolve_model

        what = params.model or "the embedded default"
        check_sizes(resolve_model(params.model), params, configs)
    ratios = ", ".join(f"{r:g}" for r in params.ratios)
    first = f", after greedy pruning of {params.prune_layers} layers" if params.prune_layers else ""
    return (f"{params.method}: compress {', '.join(configs[0]['modules'])} of {what}{first} "
            f"at ratio {ratios}, no fine-tuning, on {data.spec.name} ({len(data.train):,} "
            f"train / {len(data.dev):,} dev rows, selection by {data.spec.metric})")


def preflight(params: CompressParams) -> str:
    """Check every input before anything runs; a one-line description of the job."""
    if params.method in OFFLINE_METHODS:
        return preflight_offline(params)
    num_layers, data = check_inputs(params, [])
    from glp.core.models import resolve_model

    check_method(params, resolve_model(params.model))
    densities = ", ".join(f"{d:g}" for d in params.densities)
    return (f"{params.method}: keep {densities} of the encoder weights of {params.model} "
            f"({num_layers} layers) on {data.spec.name} ({len(data.train):,} train / "
            f"{len(data.dev):,} dev rows, selection by {data.spec.metric})")


@flow(name="glp-compress", task_runner=ThreadPoolTaskRunner(max_workers=1))
def compress(params: CompressParams) -> CompressSummary:
    """Width compression of one model on one task, end to end (see the module docstring)."""
    return run_on_task_runner(_compress, params, "glp-compress")


def _compress(params: CompressParams) -> CompressSummary:
    started = time.perf_counter()
    if params.method in OFFLINE_METHODS:
        return run_offline(params, started, CompressSummary)
    job = Job(params, [])
    configs = check_method(params, job.model_path)
    data = job.data
    # The method's code is in the job id too (the layer code already is): a changed method
    # is a new job, with new registered versions, not a rewrite of the old ones.
    job_id = job.identity("compress", params.method, [c.__dict__ for c in configs],
                          code_fingerprint(COMPRESSION_CODE))
    name = params.registered_model or f"glp-{job.slug}-{data.task}-{params.method}"
    job.start(job_id, f"{params.method}-{job.slug}-{data.task}",
              tags={"glp.method": params.method, "glp.strategy": params.method})
    try:
        reference = job.finals([(REFERENCE, "", job.num_layers, ())])
        teacher = job._fine_tune_final.submit(job.request((), "train", job.seeds[0])).result()
        rows = _compressed(job, params, configs, teacher)
        teacher_row = next(r for r in reference if r["seed"] == job.seeds[0])
        job.time_budgets(teacher_row["_checkpoint"], reference, rows, "target_density")
        versions = _register(job, name, rows) if params.register_models else {}
        job.write_finals(reference + rows)
        seconds = round(time.perf_counter() - started, 1)
        end_job_run(job.tracking_uri, job.parent_run_id, "FINISHED",
                    metrics={"fine_tunes_computed": job.counts["computed"],
                             "fine_tunes_reused": job.counts["reused"], "seconds": seconds})
    except BaseException as exc:
        job.abort(exc)
        raise
    finals = [written(r) for r in reference + rows]
    return CompressSummary(
        job_id=job_id, parent_run_id=job.parent_run_id, method=params.method, task=data.task,
        metric=data.metric, num_layers=job.num_layers, finals=finals,
        registered_model=name if versions else None, versions=versions,
        computed=job.counts["computed"], reused=job.counts["reused"], seconds=seconds,
        home=str(job.home.root), tracking_uri=job.tracking_uri)


def _compressed(job: Job, params: CompressParams, configs: list[MLPruningConfig | GrainConfig],
                teacher) -> list[dict]:
    """Every (density, seed): pruned, fine-tuned, evaluated, logged; one row each."""
    stored = {"result_storage": job.home.results}
    prune_task = prune_width.with_options(**stored)
    finish_task = fine_tune_compressed.with_options(**stored)
    handle = job.reporter.begin("finals", "compressed models", len(configs) * len(job.seeds))
    futures = {}
    for config in configs:
        for seed in job.seeds:
            request = CompressRequest(teacher=teacher, data=job.data, split="train",
                                      config=job.finetune, method=params.method,
                                      method_config=dict(config.__dict__), seed=seed,
                                      home=job.home, device=job.device)
            pruned = prune_task.submit(request)
            done = finish_task.submit(request, pruned)
            futures[config.density, seed] = (done, pruned)
    rows = []
    for count, ((density, seed), (done_future, pruned_future)) in enumerate(futures.items()):
        compressed: Compressed = done_future.result()
        job._count(pruned_future.result().checkpoint)
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
        diverged = checkpoint.diverged or evaluation.diverged or selection.diverged
        plan = compressed.plan_object
        counts = plan.parameter_counts(job.base_config)
        encoder_density = density_of(counts)
        parameters = counts["parameters"] - counts["zeroed"]  # non-zero, as in Parquet
        run_id = log_child_run(
            job.tracking_uri, job.parent_run_id, job.job_id, FINAL, checkpoint.key,
            f"{params.method}-{density_label(density)}-seed{seed}",
            params={"density": density, "seed": seed, "device": checkpoint.device,
                    "plan_kind": plan.kind, "threshold_shift": compressed.threshold_shift,
                    "kept_by_thresholds": round(compressed.remaining_after_training, 4)},
            metrics={**_finite(evaluation.metrics),
                     **{f"selection_{k}": v for k, v in _finite(selection.metrics).items()},
                     "parameters": parameters, "encoder_density": encoder_density,
                     "fine_tune_seconds": checkpoint.seconds},
            tags={**job.common_tags, "glp.density": f"{density:g}",
                  "glp.diverged": str(diverged).lower(), "glp.plan_key": plan.key},
            texts={"plan.json": plan.to_json()})
        who = {"job_id": job.job_id, "strategy": params.method,
               "variant": density_label(density), "model": params.model,
               "task": job.data.task, "method": params.method}
        rows.append(final_row(
            who, run_id=run_id, parent_run_id=job.parent_run_id, checkpoint=checkpoint,
            evaluation=evaluation, selection=selection, diverged=diverged, plan=plan,
            parameters=parameters, encoder_density=encoder_density,
            train_examples=job.data.sizes["train"],
            reused=checkpoint.flow_run_id != job.flow_run_id, target_density=density))
        job.reporter.update(handle, count + 1)
    job.reporter.end(handle)
    return rows


def _register(job: Job, name: str, rows: list[dict]) -> dict[str, str]:
    """One ONNX version per density (aliases ``density-NN`` and ``best``), by the rule of
    :mod:`tasks.registry`: chosen by the selection split, never diverged."""

    def density_of(row: dict) -> float | None:
        return row.get("target_density")

    def register(registration: Registration) -> str:
        chosen, density = registration.chosen, registration.group
        return register_onnx(
            job.tracking_uri, chosen["run_id"], chosen["model_dir"], name, job.job_id,
            registration.alias,
            tags={**job.common_tags, **registration.score_tags(), **job.version_tags(),
                  "glp.method": chosen["method"], "glp.density": f"{density:g}",
                  "glp.encoder_density": f"{chosen['encoder_density']:.4f}",
                  "glp.parameters": str(chosen["parameters"]),
                  "glp.plan_key": Plan.from_json(chosen["plan"]).key},
            description=(f"{job.params.model} compressed by {chosen['method']} to "
                         f"{chosen['encoder_density']:.3f} of its encoder weights, fine-tuned "
                         f"on {job.data.task}; dev {job.data.metric} {chosen['value']:.4f} "
                         f"(seed {chosen['seed']}, chosen by the selection split); ONNX"))

    plan = registrations(rows, density_of, density_label)
    return register_all(job.tracking_uri, name, plan, register, rows, density_of)
