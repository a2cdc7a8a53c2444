"""The ``prune`` flow: search a removal order, then fine-tune and register a model per depth.

Each greedy iteration is a set of tasks (fine-tune candidate, evaluate candidate,
select layer); the search itself is the strategy from ``glp.search``, which only sees
a scoring function. Candidates of one iteration are submitted together, so a Dask or
Ray task runner runs them in parallel; the default runner runs one at a time, which is
fastest on a small machine (each fine-tune already uses every core).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path

import prefect.runtime.flow_run
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from glp.config import FineTuneConfig, stable_hash
from glp.models import DEFAULT_MODEL, check_supported, model_fingerprint, num_encoder_layers
from glp.models import resolve_model as resolve_model_path
from glp.search import (
    CandidateScored,
    LayerSelected,
    Strategy,
    depth_plan,
    get_strategy,
    validate_budget,
)
from tasks import progress
from tasks.data import DataRef, DataSource, load_source, prepare_data
from tasks.home import RunHome
from tasks.records import record_rows
from tasks.tracking import (
    CANDIDATE,
    FINAL,
    dumps,
    end_job_run,
    log_child_run,
    register_model,
    set_aliases,
    start_job_run,
)
from tasks.training import (
    Checkpoint,
    Evaluation,
    FineTuneRequest,
    evaluate_candidate,
    evaluate_final,
    fine_tune_candidate,
    fine_tune_final,
    select_layer,
)

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "glue"
FINAL_SEED_BASE = 40  # the paper's final seeds are 40..44


class PruneParams(BaseModel):
    """Everything a pruning job depends on (validated by Prefect when the flow starts)."""

    model: str = Field(DEFAULT_MODEL, description="local model directory or hub id")
    task: str | None = Field("sst2", description="a GLUE task name (ignored with train_file)")
    data_dir: str | None = Field(None, description="folder of GLUE task folders")
    train_file: str | None = None
    dev_file: str | None = None
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    task_type: str = "classification"
    metric: str | None = None
    remove: int = Field(2, ge=1, description="layers to remove")
    strategy: str = "greedy"
    train_limit: int | None = Field(None, ge=1, description="training examples used")
    eval_limit: int | None = Field(None, ge=1, description="dev examples used")
    epochs: float = Field(3.0, gt=0)
    max_length: int = Field(128, ge=8)
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    seeds: int = Field(5, ge=1, description="seeds per final model (40, 41, ...)")
    search_seed: int = 41
    split_seed: int = 0
    selection_fraction: float = Field(0.15, gt=0, lt=1)
    home: str | None = None
    tracking_uri: str | None = None
    experiment: str = "glp"
    registered_model: str | None = None
    register_models: bool = True

    def finetune_config(self) -> FineTuneConfig:
        return FineTuneConfig(
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_length=self.max_length,
            epochs=self.epochs,
        )

    def source(self) -> DataSource:
        return DataSource(
            task=None if self.train_file else self.task,
            data_dir=self.data_dir or str(DEFAULT_DATA_DIR),
            train_file=self.train_file,
            dev_file=self.dev_file,
            text_columns=self.text_columns,
            label_column=self.label_column,
            task_type=self.task_type,
            metric=self.metric,
            name=Path(self.train_file).stem if self.train_file else "custom",
        )


class PruneSummary(BaseModel):
    job_id: str
    parent_run_id: str
    strategy: str
    task: str
    metric: str
    num_layers: int
    order: list[int]
    candidates: list[dict]
    finals: list[dict]
    registered_model: str | None
    versions: dict[str, str]
    computed: int
    reused: int
    seconds: float
    home: str
    tracking_uri: str


def check_model(params: PruneParams) -> tuple[Strategy, str, int]:
    """The strategy, the local model directory and its layer count, or a GlpError.

    Raises GlpError for an unknown strategy, an unsupported model, or more layers to remove
    than the model allows.
    """
    strategy = get_strategy(params.strategy)
    model_path = resolve_model_path(params.model)
    num_layers = num_encoder_layers(check_supported(model_path))
    validate_budget(num_layers, params.remove)
    return strategy, model_path, num_layers


def preflight(params: PruneParams) -> str:
    """Check the inputs before any run starts; a one-line description of the job.

    Raises GlpError for an unknown task or strategy, a missing file or column, an
    unsupported model, or more layers to remove than the model allows.
    """
    strategy, _, num_layers = check_model(params)
    data = load_source(params.source())
    return (f"{strategy.name}: remove {params.remove} of {num_layers} layers of {params.model} "
            f"on {data.spec.name} ({len(data.train):,} train / {len(data.dev):,} dev rows, "
            f"selection by {data.spec.metric})")


def model_slug(model: str) -> str:
    base = DEFAULT_MODEL if model == DEFAULT_MODEL else model.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base).lower()


def _reused(result: Checkpoint | Evaluation) -> bool:
    return result.flow_run_id != str(prefect.runtime.flow_run.id)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@flow(name="glp-prune", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def prune(params: PruneParams) -> PruneSummary:
    """Greedy (or baseline) layer pruning of one model on one task, end to end."""
    started = time.perf_counter()
    home = RunHome.resolve(params.home).create()
    tracking_uri = params.tracking_uri or home.tracking_uri
    reporter = progress.get_reporter()

    # Fail fast on bad input, before anything is written to MLflow.
    strategy, model_path, num_layers = check_model(params)
    model_fp = model_fingerprint(model_path)
    finetune = params.finetune_config()
    data: DataRef = prepare_data(params.source(), home, params.train_limit, params.eval_limit,
                                 params.selection_fraction, params.split_seed)
    seeds = [FINAL_SEED_BASE + i for i in range(params.seeds)]
    job_id = stable_hash("prune", model_fp, data.fingerprints, data.metric, strategy.name,
                         params.remove, finetune, params.search_seed, seeds)
    slug = model_slug(params.model)
    registered_name = params.registered_model or f"glp-{slug}-{data.task}-{strategy.name}"
    common_tags = {"glp.model": params.model, "glp.task": data.task,
                   "glp.strategy": strategy.name, "glp.metric": data.metric}
    parent_run_id = start_job_run(
        tracking_uri, params.experiment, home.mlflow_artifacts, job_id,
        f"{strategy.name}-{slug}-{data.task}-remove{params.remove}",
        params={**params.model_dump(exclude={"home", "tracking_uri"}),
                "model_fingerprint": model_fp, "num_layers": num_layers,
                **{f"data_{k}": v for k, v in data.sizes.items()}},
        tags={**common_tags, "glp.model_fingerprint": model_fp,
              "glp.data_fingerprint": stable_hash(data.fingerprints)},
    )
    counts = {"computed": 0, "reused": 0}
    # Results (the cache) live in this run home, whoever calls the flow: CLI, test, deployment.
    stored = {"result_storage": home.results}
    fine_tune_candidate_ = fine_tune_candidate.with_options(**stored)
    evaluate_candidate_ = evaluate_candidate.with_options(**stored)
    fine_tune_final_ = fine_tune_final.with_options(**stored)
    evaluate_final_ = evaluate_final.with_options(**stored)

    def count(result: Checkpoint) -> bool:
        reused = _reused(result)
        counts["reused" if reused else "computed"] += 1
        return reused

    def request(removed: tuple[int, ...], split: str, seed: int) -> FineTuneRequest:
        return FineTuneRequest(model_path=model_path, model_fingerprint=model_fp, data=data,
                               split=split, removed=removed, config=finetune, seed=seed,
                               home=home)

    def score(removal_sets):
        """Fine-tune and evaluate every candidate of one iteration (submitted together)."""
        iteration = num_layers - len(removal_sets) + 1
        handle = reporter.begin("candidates", f"iteration {iteration} candidates",
                                len(removal_sets))
        checkpoints = [fine_tune_candidate_.submit(request(r, "fit", params.search_seed))
                       for r in removal_sets]
        evaluations = [evaluate_candidate_.submit(c, data, "selection", finetune, home)
                       for c in checkpoints]
        results = []
        for done, (checkpoint, evaluation) in enumerate(zip(checkpoints, evaluations,
                                                            strict=True)):
            results.append((checkpoint.result(), evaluation.result()))
            reporter.update(handle, done + 1)
        reporter.end(handle)
        return [_Scored(c, e) for c, e in results]

    try:
        candidate_rows, selection_rows = [], []
        iteration_rows: list[dict] = []
        it_handle = reporter.begin("iterations", f"{strategy.name} search", params.remove)
        for record in strategy.search(num_layers, params.remove, score, select=select_layer):
            if isinstance(record, CandidateScored):
                checkpoint, evaluation = record.result.checkpoint, record.result.evaluation
                reused = count(checkpoint)
                run_id = log_child_run(
                    tracking_uri, parent_run_id, job_id, CANDIDATE, checkpoint.key,
                    f"it{record.iteration}-remove-{'-'.join(map(str, record.removed))}",
                    params={"iteration": record.iteration, "layer": record.layer,
                            "removed": list(record.removed), "seed": checkpoint.seed},
                    metrics={**evaluation.metrics, "fine_tune_seconds": checkpoint.seconds},
                    tags={**common_tags, "glp.iteration": record.iteration},
                )
                iteration_rows.append({
                    "job_id": job_id, "run_id": run_id, "parent_run_id": parent_run_id,
                    "flow_run_id": checkpoint.flow_run_id, "strategy": strategy.name,
                    "model": params.model, "task": data.task, "iteration": record.iteration,
                    "layer": record.layer, "removed": list(record.removed),
                    "depth": num_layers - len(record.removed), "metric": evaluation.metric,
                    "value": evaluation.score, "metrics_json": dumps(evaluation.metrics),
                    "seed": checkpoint.seed, "train_examples": data.sizes["fit"],
                    "eval_examples": evaluation.examples,
                    "fine_tune_seconds": checkpoint.seconds,
                    "eval_seconds": evaluation.seconds, "cache_key": checkpoint.key,
                    "reused": reused, "recorded_at": _now(),
                })
            elif isinstance(record, LayerSelected):
                row = {
                    "job_id": job_id, "run_id": parent_run_id, "strategy": strategy.name,
                    "model": params.model, "task": data.task, "iteration": record.iteration,
                    "layer": record.layer, "order": list(record.order),
                    "depth": num_layers - len(record.order), "metric": data.metric,
                    "value": record.score, "candidates": len(iteration_rows),
                    "cache_key": stable_hash(job_id, record.order), "recorded_at": _now(),
                }
                part = f"iteration-{record.iteration:03d}"
                if iteration_rows:
                    record_rows(home.parquet, "candidates", job_id, part, iteration_rows)
                record_rows(home.parquet, "selections", job_id, part, [row])
                candidate_rows += iteration_rows
                selection_rows.append(row)
                iteration_rows = []
                reporter.update(it_handle, record.iteration + 1)
                reporter.note(f"iteration {record.iteration + 1}: remove layer {record.layer}"
                              + (f" ({data.metric} {record.score:.4f})"
                                 if record.score is not None else ""))
        reporter.end(it_handle)
        order = list(selection_rows[-1]["order"])

        # The final protocol: every depth of the order, fine-tuned on the whole training
        # split with each seed, evaluated on the dev set (never used for selection).
        plan = depth_plan(order, num_layers)
        fin_handle = reporter.begin("finals", "final models", len(plan) * len(seeds))
        jobs = []
        for depth, removed in plan:
            for seed in seeds:
                checkpoint = fine_tune_final_.submit(request(removed, "train", seed))
                jobs.append((depth, removed, seed, checkpoint,
                             evaluate_final_.submit(checkpoint, data, "dev", finetune, home)))
        final_rows = []
        for done, (depth, removed, seed, ckpt_future, eval_future) in enumerate(jobs):
            checkpoint, evaluation = ckpt_future.result(), eval_future.result()
            reused = count(checkpoint)
            run_id = log_child_run(
                tracking_uri, parent_run_id, job_id, FINAL, checkpoint.key,
                f"final-depth{depth}-seed{seed}",
                params={"depth": depth, "removed": list(removed), "seed": seed},
                metrics={**evaluation.metrics, "fine_tune_seconds": checkpoint.seconds},
                tags={**common_tags, "glp.depth": depth},
            )
            final_rows.append({
                "job_id": job_id, "run_id": run_id, "parent_run_id": parent_run_id,
                "strategy": strategy.name, "model": params.model, "task": data.task,
                "depth": depth, "removed": list(removed), "seed": seed,
                "metric": evaluation.metric, "value": evaluation.score,
                "metrics_json": dumps(evaluation.metrics),
                "parameters": None, "train_examples": data.sizes["train"],
                "eval_examples": evaluation.examples, "fine_tune_seconds": checkpoint.seconds,
                "eval_seconds": evaluation.seconds, "cache_key": checkpoint.key,
                "reused": reused, "recorded_at": _now(), "_path": checkpoint.path,
            })
            reporter.update(fin_handle, done + 1)
        reporter.end(fin_handle)

        versions = _register(params, final_rows, registered_name, tracking_uri, job_id,
                             common_tags, model_fp, data, order) if params.register_models else {}
        for row in final_rows:
            row["parameters"] = _parameter_count(row.pop("_path"))
        record_rows(home.parquet, "finals", job_id, "finals", final_rows)
        seconds = round(time.perf_counter() - started, 1)
        end_job_run(tracking_uri, parent_run_id, "FINISHED",
                    metrics={"fine_tunes_computed": counts["computed"],
                             "fine_tunes_reused": counts["reused"], "seconds": seconds},
                    tags={"glp.order": ",".join(map(str, order))})
    except BaseException:
        end_job_run(tracking_uri, parent_run_id, "FAILED")
        raise
    return PruneSummary(
        job_id=job_id, parent_run_id=parent_run_id, strategy=strategy.name, task=data.task,
        metric=data.metric, num_layers=num_layers, order=order, candidates=candidate_rows,
        finals=final_rows, registered_model=registered_name if versions else None,
        versions=versions, computed=counts["computed"], reused=counts["reused"],
        seconds=seconds, home=str(home.root), tracking_uri=tracking_uri,
    )


class _Scored:
    """A candidate's checkpoint and evaluation; ``score`` is what the strategy compares."""

    def __init__(self, checkpoint: Checkpoint, evaluation: Evaluation):
        self.checkpoint, self.evaluation, self.score = checkpoint, evaluation, evaluation.score


def _parameter_count(checkpoint_path: str) -> int:
    """Parameters of a saved model, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for file in Path(checkpoint_path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def _register(params: PruneParams, final_rows: list[dict], name: str, tracking_uri: str,
              job_id: str, common_tags: dict, model_fp: str, data: DataRef,
              order: list[int]) -> dict[str, str]:
    """Register the best seed's model of every pruned depth; alias ``best`` and ``depth-N``."""
    by_depth: dict[int, list[dict]] = {}
    for row in final_rows:
        if row["removed"]:  # the unpruned model is the reference, not a result
            by_depth.setdefault(row["depth"], []).append(row)
    aliases, means = {}, {}
    for depth, rows in sorted(by_depth.items(), reverse=True):
        best = max(rows, key=lambda r: r["value"])
        mean = sum(r["value"] for r in rows) / len(rows)
        version = register_model(
            tracking_uri, best["run_id"], best["_path"], name, job_id, depth,
            tags={**common_tags, "glp.removed_layers": ",".join(map(str, best["removed"])),
                  "glp.depth": depth, "glp.seed": best["seed"],
                  "glp.metric_value": f"{best['value']:.6f}", "glp.metric_mean": f"{mean:.6f}",
                  "glp.base_model_fingerprint": model_fp,
                  "glp.data_fingerprint": stable_hash(data.fingerprints),
                  "glp.order": ",".join(map(str, order))},
            description=(f"{params.model} with layers {best['removed']} removed "
                         f"({depth} layers left), fine-tuned on {data.task}; dev "
                         f"{data.metric} {best['value']:.4f}"),
        )
        for row in rows:
            row["registered_model"], row["model_version"] = name, version
        aliases[f"depth-{depth}"] = version
        means[version] = mean
    if aliases:
        aliases["best"] = max(means, key=means.get)
        set_aliases(tracking_uri, name, aliases)
    return aliases
