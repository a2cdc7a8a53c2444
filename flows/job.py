"""What the prune and compare flows share: a job's inputs, its search and its final models.

A ``Job`` is built inside a running flow. It checks the model, prepares the data splits,
and opens the job's MLflow parent run. It then turns a strategy's records into cached
Prefect tasks, child runs and Parquet parts, and runs the final protocol for any set of
(strategy, depth) plans. Strategies that share a candidate or a final model share its
fine-tune: the tasks are cached by what decides their result, not by who asked.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import prefect.runtime.flow_run
from pydantic import BaseModel, Field, field_validator

import glp
from flows.runners import parse_task_runner
from glp import GlpError
from glp.core.checkpoint import saved_parameters
from glp.core.hashing import stable_hash
from glp.core.models import (
    DEFAULT_MODEL,
    check_supported,
    check_weights,
    model_fingerprint,
    num_encoder_layers,
)
from glp.core.models import resolve_model as resolve_model_path
from glp.core.plan import Plan
from glp.core.provenance import code_fingerprint
from glp.methods import LAYER_METHOD, REFERENCE
from glp.methods.layers.search import (
    FULL,
    SEARCHES,
    Budget,
    CandidateScored,
    LayerScored,
    LayerSelected,
    Strategy,
    StrategyOptions,
    SubsetChosen,
    get_strategy,
    plan_of,
    removal_order,
)
from glp.training.config import FineTuneConfig
from glp.training.data import TaskData
from glp.training.train import check_precision, resolve_device
from tasks import progress
from tasks.analysis import SimilarityRequest, layer_similarity, measure_latencies
from tasks.data import DataRef, DataSource, checked_train, load_source, prepare_data
from tasks.home import RunHome
from tasks.records import (
    candidate_row,
    final_row,
    record_rows,
    score_row,
    selection_row,
    written,
)
from tasks.registry import Registration, register_all, registrations
from tasks.search import select_layer
from tasks.tracking import (
    CANDIDATE,
    FINAL,
    end_job_run,
    log_child_run,
    log_run_metrics,
    register_model,
    register_onnx,
    start_job_run,
)
from tasks.training import (
    CODE,
    Checkpoint,
    FineTuneRequest,
    Scored,
    Teacher,
    evaluate_final,
    fine_tune_final,
    score_candidate,
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
    prefilter_keep: int = Field(0, ge=0, description="greedy: fine-tune only the m candidates "
                                "with the lowest block influence (0 = all)")
    search: str = Field("full", description="greedy: full (the reference protocol), halving "
                        "(successive halving) or warm (from one fine-tuned full model)")
    search_fraction: float | None = Field(None, ge=0.01, le=1, allow_inf_nan=False, description=(
        "greedy: halving's first-rung share of the budget (0.1) or warm's repair (0.25)"))
    random_seed: int = Field(0, description="random: the seed of the random order")
    exhaustive_limit: int = Field(64, ge=1, description="exhaustive: most fine-tunes allowed")
    train_limit: int | None = Field(None, ge=1, description="training examples used")
    eval_limit: int | None = Field(None, ge=1, description="dev examples used")
    epochs: float = Field(3.0, gt=0, allow_inf_nan=False)
    max_length: int = Field(128, ge=8)
    learning_rate: float = Field(2e-5, gt=0, allow_inf_nan=False)
    batch_size: int = Field(32, ge=1)
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False,
                                 description="gradient-norm clipping (0 = off)")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    precision: str = Field("fp32", description="fp32, or bf16/fp16 autocast on a GPU")
    length_grouping: bool = Field(True, description="batches of similar length (faster on CPU)")
    keep_candidates: bool = Field(False, description="keep every search candidate's weights")
    trust_remote_code: bool = Field(False, description="allow a model with custom code")
    seeds: int = Field(5, ge=1, description="seeds per final model (40, 41, ...)")
    distill: bool = Field(False, description=(
        "also fine-tune every pruned depth with knowledge distillation from the unpruned "
        "fine-tuned model (seed 40's), beside the plain fine-tune"))
    distill_temperature: float = Field(2.0, gt=0, allow_inf_nan=False)
    search_seed: int = 41
    split_seed: int = 0
    selection_fraction: float = Field(0.15, gt=0, lt=1, allow_inf_nan=False)
    home: str | None = None
    tracking_uri: str | None = None
    experiment: str = "glp"
    registered_model: str | None = None
    register_models: bool = True
    task_runner: str = Field("sequential", description=(
        "where fine-tunes run: sequential, threads:N, dask, dask:N, dask:tcp://HOST:PORT, "
        "ray, ray:ray://HOST:PORT (flows/runners.py); not part of the job id"))

    @field_validator("task_runner")
    @classmethod
    def _check_task_runner(cls, value: str) -> str:
        return parse_task_runner(value).spec

    def finetune_config(self) -> FineTuneConfig:
        return FineTuneConfig(
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_length=self.max_length,
            epochs=self.epochs,
            max_grad_norm=self.max_grad_norm or None,
            precision=self.precision,
            length_grouping=self.length_grouping,
        )

    def strategy_options(self, **overrides) -> StrategyOptions:
        values = {"seed": self.random_seed, "prefilter_keep": self.prefilter_keep,
                  "search": self.search, "search_fraction": self.search_fraction,
                  "exhaustive_limit": self.exhaustive_limit, **overrides}
        return StrategyOptions(**values)

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


def check_model(params: PruneParams, strategies: list[Strategy]) -> tuple[str, int]:
    """The local model directory and its layer count, or a GlpError.

    Raises GlpError for an unsupported model, custom model code without
    ``trust_remote_code``, damaged weights, or a budget a strategy cannot search.
    """
    model_path = resolve_model_path(params.model)
    config = check_supported(model_path, trust_remote_code=params.trust_remote_code)
    check_weights(model_path)
    num_layers = num_encoder_layers(config)
    for strategy in strategies:
        strategy.validate(num_layers, params.remove)
    return model_path, num_layers


def check_options(params: PruneParams) -> str:
    """Options that would be silently ignored, and the device; returns the device.

    Raises GlpError naming the option as the user typed it.
    """
    given = params.model_fields_set
    if params.train_file:
        if "task" in given and params.task:
            raise GlpError(f"--task {params.task} and --train-file: choose one (a GLUE task "
                           "or your own data)")
        if params.data_dir:
            raise GlpError("--data-dir is the folder of GLUE tasks; with --train-file it "
                           "would be ignored")
    else:
        if params.text_columns or ("label_column" in given
                                   and params.label_column != "label"):
            option = "--text-column" if params.text_columns else "--label-column"
            raise GlpError(f"{option}: a GLUE task ({params.task}) has its own columns; "
                           f"{option} is for --train-file data")
        if params.dev_file:
            raise GlpError("--dev-file is for your own data and needs --train-file; a GLUE "
                           f"--task ({params.task}) brings its own dev set")
        for name, option in (("task_type", "--task-type"), ("metric", "--metric")):
            value = getattr(params, name)
            if name in given and value is not None:
                raise GlpError(f"{option} {value}: a GLUE task ({params.task}) has its own "
                               f"{name.replace('_', ' ')}; {option} is for --train-file data")
    device = resolve_device(params.device)
    check_precision(params.precision, device)
    return str(device)


def check_inputs(params: PruneParams, strategies: list[Strategy]) -> tuple[int, TaskData]:
    """Every check a run needs before it starts: the options, the device, the model, each
    strategy's budget, and the data (task, files, columns, labels of the subset that will
    be used). Returns the layer count and the loaded data."""
    check_options(params)
    _, num_layers = check_model(params, strategies)
    data = load_source(params.source())
    checked_train(data, params.train_limit, params.split_seed)
    return num_layers, data


def _strategy_names(params: PruneParams) -> list[str]:
    """The strategies a prune (--strategy) or compare (--strategies) job runs, lower-case."""
    if getattr(params, "methods", None):  # compare --methods: the layer strategies it runs
        from flows.methods import layer_strategies, parse_methods

        return list(layer_strategies(parse_methods(params.methods)))
    value = getattr(params, "strategies", None) or params.strategy
    names = value.split(",") if isinstance(value, str) else list(value)
    return [name.strip().lower() for name in names if name.strip()]


def _runs_greedy(params: PruneParams) -> bool:
    return "greedy" in _strategy_names(params)


def _strategy_option(params: PruneParams) -> str:
    if getattr(params, "methods", None):
        return f"--methods {','.join(params.methods)} has no greedy"
    if "strategies" in type(params).model_fields:
        return f"--strategies {','.join(_strategy_names(params))} has no greedy"
    return f"--strategy is {params.strategy}"


def check_search(params: PruneParams) -> None:
    """--search, --search-fraction and --prefilter-keep, refused in the user's words
    before any strategy is built."""
    if params.prefilter_keep and not _runs_greedy(params):
        raise GlpError(f"--prefilter-keep {params.prefilter_keep}: only the greedy strategy "
                       f"pre-filters ({_strategy_option(params)})")
    if params.search not in SEARCHES:
        raise GlpError(f"--search '{params.search}': choose one of: {', '.join(SEARCHES)}")
    if params.search_fraction is not None and params.search == "full":
        raise GlpError(f"--search-fraction {params.search_fraction:g}: the share of the "
                       "budget is for --search halving or warm (the full search trains "
                       "every candidate for the whole budget)")
    if params.search != "full" and not _runs_greedy(params):
        raise GlpError(f"--search {params.search}: only the greedy strategy searches "
                       f"({_strategy_option(params)})")


def strategy_for(params: PruneParams, name: str, **options) -> Strategy:
    check_search(params)
    return get_strategy(name, params.strategy_options(**options))


def model_slug(model: str) -> str:
    base = DEFAULT_MODEL if model == DEFAULT_MODEL else model.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base).lower()


@dataclass
class SearchOutcome:
    """What one strategy found and what it cost."""

    strategy: Strategy
    plan: list[tuple[int, tuple[int, ...]]]  # (depth, removed), unpruned first
    order: list[int]  # the nested removal order ([] for per-size strategies)
    candidates: list[dict] = field(default_factory=list)
    selections: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    fine_tunes: int = 0  # candidate fine-tunes this strategy needs (shared ones included)
    # the same in whole-budget equivalents: a halving rung or a warm repair counts its
    # share of the budget, and a warm start's shared fine-tune counts 1
    equivalents: float = 0.0
    seconds: float = 0.0  # their fine-tune and evaluation time, as measured when computed
    zero_shot_passes: int = 0


class Job:
    """One job inside a running flow: inputs checked, data prepared, tasks bound to the home."""

    def __init__(self, params: PruneParams, strategies: list[Strategy]):
        self.params = params
        # Fail fast on bad input, before anything is written (home, MLflow, Parquet).
        self.device = check_options(params)
        self.model_path, self.num_layers = check_model(params, strategies)
        self.home = RunHome.resolve(params.home).create()
        self.home.remove_stale_temporaries()
        self.tracking_uri = params.tracking_uri or self.home.tracking_uri
        self.reporter = progress.get_reporter()
        self.model_fp = model_fingerprint(self.model_path)
        self.finetune = params.finetune_config()
        self.data: DataRef = prepare_data(params.source(), self.home, params.train_limit,
                                          params.eval_limit, params.selection_fraction,
                                          params.split_seed)
        self.seeds = [FINAL_SEED_BASE + i for i in range(params.seeds)]
        self.slug = model_slug(params.model)
        self.counts = {"computed": 0, "reused": 0}
        self._seen: set[str] = set()
        # Results (the cache) live in this run home, whoever calls the flow.
        stored = {"result_storage": self.home.results}
        self._score_candidate = score_candidate.with_options(**stored)
        self._fine_tune_final = fine_tune_final.with_options(**stored)
        self._warm_start = fine_tune_final.with_options(name="fine-tune-warm-start", **stored)
        self.warm_seconds: float | None = None
        self._evaluate_final = evaluate_final.with_options(**stored)
        self._similarity = layer_similarity.with_options(**stored)
        self._latency = measure_latencies.with_options(**stored)
        from transformers import AutoConfig

        # The base architecture, for plan arithmetic (parameters, encoder density).
        self.base_config = AutoConfig.from_pretrained(
            self.model_path, num_labels=self.data.num_labels,
            trust_remote_code=params.trust_remote_code)
        self.flow_run_id = str(prefect.runtime.flow_run.id)
        self.job_id = ""
        self.parent_run_id = ""
        self.common_tags: dict[str, str] = {}

    # ------------------------------------------------------------------ identity and runs

    def identity(self, kind: str, *parts: object) -> str:
        """The job id: a hash of everything that decides the results, the code that
        computes them and the kind of device included (so a code change is a new job,
        with its own MLflow run and registered versions, not a rewrite of the old one)."""
        return stable_hash(kind, self.model_fp, self.data.fingerprints, self.data.metric,
                           self.params.remove, self.finetune.result_dict(),
                           self.params.search_seed, self.seeds, code_fingerprint(CODE),
                           self.device.partition(":")[0], *parts,
                           *((("distill", self.params.distill_temperature),)
                             if self.params.distill else ()))

    def start(self, job_id: str, run_name: str, tags: dict[str, str]) -> str:
        progress.clear_stop()
        self.job_id = job_id
        self.common_tags = {"glp.model": self.params.model, "glp.task": self.data.task,
                            "glp.metric": self.data.metric, **tags}
        self.parent_run_id = start_job_run(
            self.tracking_uri, self.params.experiment, self.home.mlflow_artifacts, job_id,
            run_name,
            params={**self.params.model_dump(exclude={"home", "tracking_uri", "task_runner",
                                                      "device"}),
                    "model_fingerprint": self.model_fp, "num_layers": self.num_layers,
                    "device_used": self.device,
                    **{f"data_{k}": v for k, v in self.data.sizes.items()}},
            tags={**self.common_tags, "glp.model_fingerprint": self.model_fp,
                  "glp.data_fingerprint": self.data_fingerprint},
        )
        return self.parent_run_id

    def abort(self, exc: BaseException) -> None:
        """The flow body failed or was interrupted: stop this process's fine-tunes at
        their next step (a thread pool would otherwise finish every queued one before the
        flow could end) and close the parent run as FAILED, or KILLED when interrupted."""
        progress.request_stop()
        end_job_run(self.tracking_uri, self.parent_run_id,
                    "FAILED" if isinstance(exc, Exception) else "KILLED")

    def version_tags(self) -> dict[str, str]:
        """What every registered version of this job records about its inputs."""
        return {"glp.base_model_fingerprint": self.model_fp, "glp.version": glp.__version__,
                "glp.data_fingerprint": self.data_fingerprint,
                "glp.selection_fingerprint": self.data.fingerprints["selection"]}

    @property
    def data_fingerprint(self) -> str:
        return stable_hash(self.data.fingerprints)

    def _count(self, checkpoint: Checkpoint) -> bool:
        """Whether the fine-tune came from the cache; each fine-tune is counted once per job."""
        reused = checkpoint.flow_run_id != str(prefect.runtime.flow_run.id)
        if checkpoint.key not in self._seen:
            self._seen.add(checkpoint.key)
            self.counts["reused" if reused else "computed"] += 1
        return reused

    def request(self, removed: tuple[int, ...], split: str, seed: int,
                keep_weights: bool = True, teacher: Teacher | None = None) -> FineTuneRequest:
        return FineTuneRequest(model_path=self.model_path, model_fingerprint=self.model_fp,
                               data=self.data, split=split, removed=removed,
                               config=self.finetune, seed=seed, home=self.home,
                               device=self.device, keep_weights=keep_weights,
                               trust_remote_code=self.params.trust_remote_code,
                               teacher=teacher)

    def teacher_checkpoint(self) -> Checkpoint:
        """The teacher of every method that needs one: the unpruned model fine-tuned on the
        whole training split with the first final seed (the reference row's own fine-tune,
        cached)."""
        checkpoint = self._fine_tune_final.submit(
            self.request((), "train", self.seeds[0])).result()
        if checkpoint.diverged or checkpoint.path is None:
            raise GlpError("the unpruned model's fine-tune (the teacher) diverged; lower --lr "
                           "or turn on clipping (--max-grad-norm)")
        return checkpoint

    def teacher(self) -> Teacher:
        """``--distill``'s teacher (see :meth:`teacher_checkpoint`)."""
        checkpoint = self.teacher_checkpoint()
        return Teacher(path=checkpoint.path, key=checkpoint.key,
                       temperature=self.params.distill_temperature)

    # ------------------------------------------------------------------ search

    def score(self, removal_sets, budget: Budget = FULL) -> list[Scored]:
        """Fine-tune and score candidates, all submitted together (parallel runners), for
        ``budget``'s share of the epochs, from the warm start when it asks for one."""
        share = "" if budget.fraction == 1 else f" at {budget.fraction:g} of the budget"
        handle = self.reporter.begin("candidates", f"{len(removal_sets)} candidates{share}",
                                     len(removal_sets))
        keep = self.params.keep_candidates
        requests = [self.request(r, "fit", self.params.search_seed, keep_weights=keep)
                    for r in removal_sets]
        if budget != FULL:
            # rounded: 3.0 * 0.1 is 0.30000000000000004, one step more than 0.3 at times
            config = dataclasses.replace(
                self.finetune, epochs=round(self.finetune.epochs * budget.fraction, 9))
            start = self.warm_start() if budget.warm else None
            requests = [request.model_copy(update={"config": config}) for request in requests]
            if start is not None:
                requests = [request.model_copy(update={
                    "model_path": start.path,
                    "model_fingerprint": stable_hash("warm-start", start.key)})
                    for request in requests]
        futures = [self._score_candidate.submit(request, "selection") for request in requests]
        results = []
        for done, future in enumerate(futures):
            results.append(future.result())
            self.reporter.update(handle, done + 1)
        self.reporter.end(handle)
        return results

    def warm_start(self) -> Checkpoint:
        """The fine-tuned unpruned model every warm-start candidate begins from: the fit
        split, the search seed, the whole budget (a cached task, computed once per job)."""
        checkpoint = self._warm_start.submit(self.request((), "fit", self.params.search_seed)
                                             ).result()
        if checkpoint.key not in self._seen:
            self.reporter.note(f"warm start: the unpruned model fine-tuned on the fit split "
                               f"({checkpoint.seconds:.0f} s)")
            self._count(checkpoint)
            self.warm_seconds = checkpoint.seconds
        if not Path(checkpoint.path).is_dir():
            raise GlpError(f"the warm start's checkpoint {checkpoint.path} is missing; "
                           "delete the run home's prefect/results to recompute, or restore "
                           "the artifacts folder")
        if checkpoint.diverged:
            raise GlpError("the warm start (the unpruned model fine-tuned on the fit split) "
                           "diverged; lower --lr, or use --search full or halving")
        return checkpoint

    def similarity(self, removed: tuple[int, ...]):
        """Hidden-state similarity of the pre-trained model without ``removed`` (cached)."""
        request = SimilarityRequest(model_path=self.model_path, model_fingerprint=self.model_fp,
                                    data=self.data, split="selection", removed=removed,
                                    max_length=self.finetune.max_length, home=self.home)
        return self._similarity.submit(request).result().matrices()

    def search(self, strategy: Strategy) -> SearchOutcome:
        """Run one strategy; log its candidates and write its Parquet parts per iteration."""
        params, data = self.params, self.data
        label = strategy.label
        base = {"job_id": self.job_id, "strategy": strategy.name, "variant": strategy.variant,
                "model": params.model, "task": data.task}
        outcome = SearchOutcome(strategy, [], [])
        pending: dict[str, list[dict]] = {"candidates": [], "scores": []}
        passes = 0

        def similarity(removed):
            nonlocal passes
            passes += 1
            return self.similarity(removed)

        handle = self.reporter.begin("iterations", f"{label} search", params.remove)
        records = []
        for record in strategy.search(self.num_layers, params.remove, self.score,
                                      select=select_layer, similarity=similarity):
            records.append(record)
            if isinstance(record, CandidateScored):
                pending["candidates"].append(self._candidate_row(base, record))
                outcome.fine_tunes += 1
                outcome.equivalents += record.budget
                outcome.seconds += (record.result.checkpoint.seconds
                                    + record.result.evaluation.seconds)
            elif isinstance(record, LayerScored):
                pending["scores"].append(score_row(base, record))
            elif isinstance(record, LayerSelected | SubsetChosen):
                chosen = (list(record.order) if isinstance(record, LayerSelected)
                          else list(record.removed))
                iteration = (record.iteration if isinstance(record, LayerSelected)
                             else record.count - 1)
                row = selection_row(
                    base, run_id=self.parent_run_id, iteration=iteration,
                    layer=getattr(record, "layer", None), order=chosen,
                    num_layers=self.num_layers, metric=data.metric, value=record.score,
                    candidates=len(pending["candidates"]),
                    cache_key=stable_hash(self.job_id, label, chosen))
                part = f"{label}-iteration-{iteration:03d}"
                for table, rows in pending.items():
                    if rows:
                        record_rows(self.home.parquet, table, self.job_id, part, rows)
                record_rows(self.home.parquet, "selections", self.job_id, part, [row])
                outcome.candidates += pending["candidates"]
                outcome.scores += pending["scores"]
                pending = {"candidates": [], "scores": []}
                outcome.selections.append(row)
                self.reporter.update(handle, iteration + 1)
                what = (f"remove layer {record.layer}" if isinstance(record, LayerSelected)
                        else f"remove layers {chosen}")
                score = f" ({data.metric} {record.score:.4f})" if record.score is not None else ""
                self.reporter.note(f"{label} {iteration + 1}: {what}{score}")
        self.reporter.end(handle)
        outcome.plan = plan_of(records, self.num_layers)
        outcome.order = list(removal_order(records))
        if self.warm_seconds is not None and getattr(strategy, "search_kind", "") == "warm":
            outcome.fine_tunes += 1
            outcome.equivalents += 1.0
            outcome.seconds += self.warm_seconds
        outcome.equivalents = round(outcome.equivalents, 6)
        outcome.seconds = round(outcome.seconds, 3)
        outcome.zero_shot_passes = passes
        return outcome

    def _candidate_row(self, base: dict, record: CandidateScored) -> dict:
        checkpoint, evaluation = record.result.checkpoint, record.result.evaluation
        reused = self._count(checkpoint)
        run_id = log_child_run(
            self.tracking_uri, self.parent_run_id, self.job_id, CANDIDATE, checkpoint.key,
            f"candidate-remove-{'-'.join(map(str, record.removed))}"
            + (f"-at-{record.budget:g}" if record.budget < 1 else ""),
            params={"iteration": record.iteration, "layer": record.layer,
                    "removed": list(record.removed), "seed": checkpoint.seed,
                    "device": checkpoint.device, "budget": record.budget},
            metrics={**_finite(evaluation.metrics), "fine_tune_seconds": checkpoint.seconds},
            tags={**self.common_tags, "glp.iteration": record.iteration,
                  "glp.diverged": str(evaluation.diverged).lower()},
        )
        return candidate_row(base, record, run_id=run_id, parent_run_id=self.parent_run_id,
                             num_layers=self.num_layers, train_examples=self.data.sizes["fit"],
                             reused=reused)

    # ------------------------------------------------------------------ finals

    def finals(self, plans: list[tuple[str, str, int, tuple[int, ...]]],
               measure_latency: bool = False) -> list[dict]:
        """The final protocol for (strategy, variant, depth, removed) entries.

        Every removed set is fine-tuned on the whole training split with each seed and
        evaluated on the dev set (the report: never used to choose) and on the selection
        split (which chooses the registered seed and the ``best`` alias), once however
        many strategies chose it. Returns one row per entry and seed (with ``_path`` to
        the checkpoint).
        """
        unique = sorted({removed for _, _, _, removed in plans}, key=lambda r: (len(r), r))
        teacher = self.teacher() if self.params.distill and any(unique) else None
        # (removed, distilled): a pruned set is also distilled from the teacher with --distill
        kinds = [(removed, False) for removed in unique] + (
            [(removed, True) for removed in unique if removed] if teacher else [])
        total = len(kinds) * len(self.seeds)
        handle = self.reporter.begin("finals", "final models", total)
        jobs = {}
        for removed, distilled in kinds:
            for seed in self.seeds:
                checkpoint = self._fine_tune_final.submit(self.request(
                    removed, "train", seed, teacher=teacher if distilled else None))
                evaluations = [self._evaluate_final.submit(checkpoint, self.data, split,
                                                           self.finetune, self.home,
                                                           self.device)
                               for split in ("dev", "selection")]
                jobs[removed, distilled, seed] = (checkpoint, *evaluations)
        done_jobs: dict[tuple, dict] = {}
        for done, ((removed, distilled, seed), futures) in enumerate(jobs.items()):
            checkpoint, evaluation, selection = (f.result() for f in futures)
            diverged = evaluation.diverged or selection.diverged
            reused = self._count(checkpoint)
            depth = self.num_layers - len(removed)
            kd = {"distilled_from": teacher.key,
                  "distill_temperature": teacher.temperature} if distilled else {}
            run_id = log_child_run(
                self.tracking_uri, self.parent_run_id, self.job_id, FINAL, checkpoint.key,
                f"final-depth{depth}-seed{seed}" + ("-kd" if distilled else ""),
                params={"depth": depth, "removed": list(removed), "seed": seed,
                        "device": checkpoint.device, **kd},
                metrics={**_finite(evaluation.metrics),
                         **{f"selection_{k}": v for k, v in _finite(selection.metrics).items()},
                         "fine_tune_seconds": checkpoint.seconds},
                tags={**self.common_tags, "glp.depth": depth,
                      "glp.diverged": str(diverged).lower()},
                texts={"plan.json": Plan.layers(self.num_layers, removed).to_json()},
            )
            done_jobs[removed, distilled, seed] = {
                "run_id": run_id, "checkpoint": checkpoint, "evaluation": evaluation,
                "selection": selection, "diverged": diverged, "reused": reused}
            self.reporter.update(handle, done + 1)
        self.reporter.end(handle)

        latency: dict[tuple, float] = {}
        batch = None
        if measure_latency:  # a distilled model has the same architecture: the same time
            first = [done_jobs[removed, False, self.seeds[0]]["checkpoint"]
                     for removed in unique]
            measured = self._latency(first, self.data, "dev", self.finetune.max_length,
                                     self.home, self.device)
            batch = measured.batch_size
            latency = {removed: measured.median_ms[c.key]
                       for removed, c in zip(unique, first, strict=True)}
        parameters = {removed: saved_parameters(
            done_jobs[removed, False, self.seeds[0]]["checkpoint"].path) for removed in unique}
        layer_plans = {removed: Plan.layers(self.num_layers, removed) for removed in unique}
        density = {removed: plan.encoder_density(self.base_config)
                   for removed, plan in layer_plans.items()}
        rows = []
        entries = [(strategy, variant, removed, False) for strategy, variant, _, removed in plans]
        if teacher:
            entries += [(strategy, distilled_variant(variant), removed, True)
                        for strategy, variant, _, removed in plans if removed]
        for strategy, variant, removed, distilled in entries:
            who = {"job_id": self.job_id, "strategy": strategy, "variant": variant,
                   "model": self.params.model, "task": self.data.task,
                   "method": REFERENCE if strategy == REFERENCE else LAYER_METHOD}
            for seed in self.seeds:
                job = done_jobs[removed, distilled, seed]
                rows.append(final_row(
                    who, run_id=job["run_id"], parent_run_id=self.parent_run_id,
                    checkpoint=job["checkpoint"], evaluation=job["evaluation"],
                    selection=job["selection"], diverged=job["diverged"],
                    plan=layer_plans[removed], parameters=parameters[removed],
                    encoder_density=density[removed], train_examples=self.data.sizes["train"],
                    reused=job["reused"], latency_ms=latency.get(removed),
                    latency_batch=batch, distilled=distilled))
        return rows

    def time_budgets(self, source: Checkpoint, reference: list[dict], rows: list[dict],
                     budget: str) -> None:
        """Latency of ``source`` and of each budget's first model that did not diverge
        (``budget`` names the row column, e.g. ``target_density``), measured interleaved:
        the ``reference`` rows get the source's, every row of a budget its model's (as in
        compare), and the runs of the timed models log it."""
        first = {}
        for row in rows:
            if not row["diverged"]:
                first.setdefault(row[budget], row["_checkpoint"])
        checkpoints = [source, *first.values()]
        measured = self._latency(checkpoints, self.data, "dev", self.finetune.max_length,
                                 self.home, self.device)
        for row in reference:
            row["latency_ms"] = measured.median_ms[source.key]
            row["latency_batch"] = measured.batch_size
        for row in rows:
            checkpoint = first.get(row[budget])
            if checkpoint is not None:
                row["latency_ms"] = measured.median_ms[checkpoint.key]
                row["latency_batch"] = measured.batch_size
        timed = {c.key for c in checkpoints}
        for row in reference + rows:
            if row["cache_key"] in timed and row.get("latency_ms") is not None:
                log_run_metrics(self.tracking_uri, row["run_id"],
                                {"latency_ms": row["latency_ms"],
                                 "latency_batch": row["latency_batch"]})

    def write_finals(self, rows: list[dict]) -> None:
        record_rows(self.home.parquet, "finals", self.job_id, "finals",
                    [written(row) for row in rows])


KD = "kd"
"""The variant suffix of the models distilled from the unpruned one (``--distill``)."""


def distilled_variant(variant: str) -> str:
    """``kd``, or ``halving-0.1-kd``: a distilled model's variant."""
    return f"{variant}-{KD}" if variant else KD


def final_plans(outcomes: list[SearchOutcome]) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """The reference row once, then every strategy's pruned depths."""
    entries = []
    for outcome in outcomes:
        for depth, removed in outcome.plan:
            if removed:
                entries.append((outcome.strategy.name, outcome.strategy.variant, depth,
                                removed))
            elif not entries or entries[0][0] != REFERENCE:
                entries.insert(0, (REFERENCE, "", depth, removed))
    return entries


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """The finite metrics (MLflow would store a diverged model's NaN as a number)."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def register_depths(params: PruneParams, job: Job, final_rows: list[dict], name: str,
                    outcome: SearchOutcome, distilled: bool = False) -> dict[str, str]:
    """Register one model per pruned depth (aliases ``depth-N`` and ``best``), by the rule
    of :mod:`tasks.registry`: chosen by the selection split, never diverged. Each is
    registered twice: as a transformers pipeline in ``name``, and as ONNX in
    ``name-onnx`` (same versions' models, same aliases) for serving without glp or
    transformers. Returns the pipeline model's aliases."""
    data = job.data
    order = outcome.order or [layer for _, removed in outcome.plan[-1:] for layer in removed]

    def depth_of(row: dict) -> int | None:
        mine = bool(row.get("distilled")) == distilled  # the plain or the distilled models
        return None if row["strategy"] == REFERENCE or not mine else row["depth"]

    how = (f"fine-tuned on {data.task} with distillation from the unpruned model"
           if distilled else f"fine-tuned on {data.task}")

    def register(registration: Registration) -> str:
        chosen, depth = registration.chosen, registration.group
        return register_model(
            job.tracking_uri, chosen["run_id"], chosen["_path"], name, job.job_id, depth,
            tags={**job.common_tags, **registration.score_tags(), **job.version_tags(),
                  "glp.removed_layers": ",".join(map(str, chosen["removed"])),
                  "glp.depth": depth, "glp.order": ",".join(map(str, order))},
            description=(f"{params.model} with layers {chosen['removed']} removed "
                         f"({depth} layers left), {how}; dev "
                         f"{data.metric} {chosen['value']:.4f} (seed {chosen['seed']}, chosen "
                         "by the selection split)"),
        )

    def register_as_onnx(registration: Registration) -> str:
        chosen, depth = registration.chosen, registration.group
        return register_onnx(
            job.tracking_uri, chosen["run_id"], chosen["_path"], f"{name}-onnx", job.job_id,
            registration.alias,
            tags={**job.common_tags, **registration.score_tags(), **job.version_tags(),
                  "glp.removed_layers": ",".join(map(str, chosen["removed"])),
                  "glp.depth": str(depth), "glp.order": ",".join(map(str, order))},
            description=f"{params.model} with layers {chosen['removed']} removed, as ONNX")

    plan = registrations(final_rows, depth_of, lambda depth: f"depth-{depth}")
    aliases = register_all(job.tracking_uri, name, plan, register, final_rows, depth_of)
    # The ONNX twin: its own registered model, so that each alias names one flavour.
    register_all(job.tracking_uri, f"{name}-onnx", plan, register_as_onnx,
                 [dict(row) for row in final_rows], depth_of)
    return aliases
