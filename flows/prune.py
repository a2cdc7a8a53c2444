"""The ``prune`` flow: search a removal order, then fine-tune and register a model per depth.

Each greedy iteration is a set of tasks (fine-tune candidate, evaluate candidate,
select layer); the search itself is the strategy from ``glp.methods.layers.search``, which only sees
a scoring function. Candidates of one iteration are submitted together, so a Dask or
Ray task runner runs them in parallel; the default runner runs one at a time, which is
fastest on a small machine (each fine-tune already uses every core).
"""

from __future__ import annotations

import time

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.job import Job, final_plans
from flows.params import PruneParams, check_inputs, model_slug, strategy_for
from flows.registration import register_depths
from flows.runners import run_on_task_runner

__all__ = ["PruneParams", "PruneSummary", "preflight", "prune", "model_slug"]


class PruneSummary(BaseModel):
    job_id: str
    parent_run_id: str
    strategy: str
    task: str
    metric: str
    num_layers: int
    order: list[int]
    plan: list[list[int]]  # removed layers per count, 1..k
    candidates: list[dict]
    search_fine_tunes: int = 0  # the search's fine-tunes (a warm start's shared one included)
    search_equivalents: float = 0.0  # the same in whole-budget equivalents
    search_seconds: float = 0.0  # their fine-tune and evaluation time, as measured when computed
    finals: list[dict]
    registered_model: str | None
    versions: dict[str, str]
    computed: int
    reused: int
    seconds: float
    home: str
    tracking_uri: str


def preflight(params: PruneParams) -> str:
    """Check the inputs before any run starts; a one-line description of the job.

    Raises GlpError for an unknown task or strategy, a missing file or column, an
    unsupported model, or more layers to remove than the model allows.
    """
    strategy = strategy_for(params, params.strategy)
    num_layers, data, notes = check_inputs(params, [strategy])
    return (f"{strategy.label}: remove {params.remove} of {num_layers} layers of "
            f"{params.model} on {data.spec.name} ({len(data.train):,} train / "
            f"{len(data.dev):,} dev rows, selection by {data.spec.metric})"
            + notes)


@flow(name="glp-prune", task_runner=ThreadPoolTaskRunner(max_workers=1))
def prune(params: PruneParams) -> PruneSummary:
    """Greedy (or baseline) layer pruning of one model on one task, end to end.

    ``params.task_runner`` picks where the fine-tunes run (flows/runners.py): any runner
    but ``sequential`` runs the work as a subflow, ``glp-prune-<kind>``, on that runner.
    """
    return run_on_task_runner(_prune, params, "glp-prune")


def _prune(params: PruneParams) -> PruneSummary:
    started = time.perf_counter()
    strategy = strategy_for(params, params.strategy)
    job = Job(params, [strategy])
    data = job.data
    job_id = job.identity("prune", strategy.name, strategy.variant)
    registered_name = (params.registered_model
                       or f"glp-{job.slug}-{data.task}-{strategy.label}")
    job.start(job_id, f"{strategy.label}-{job.slug}-{data.task}-remove{params.remove}",
              tags={"glp.strategy": strategy.name, "glp.variant": strategy.variant})
    try:
        outcome = job.search(strategy)
        # The final protocol: every depth of the plan, fine-tuned on the whole training
        # split with each seed, evaluated on the dev set (never used for selection).
        final_rows = job.finals(final_plans([outcome]))
        versions = (register_depths(params, job, final_rows, registered_name, outcome)
                    if params.register_models else {})
        if params.register_models and params.distill:  # the distilled models: their own name
            register_depths(params, job, final_rows, f"{registered_name}-kd", outcome,
                            distilled=True)
        job.write_finals(final_rows)
        seconds = round(time.perf_counter() - started, 1)
        job.finish(metrics={"fine_tunes_computed": job.counts["computed"],
                            "fine_tunes_reused": job.counts["reused"], "seconds": seconds,
                            "search_fine_tunes": outcome.fine_tunes,
                            "search_equivalents": outcome.equivalents},
                   tags={"glp.order": ",".join(map(str, outcome.order))})
    except BaseException as exc:
        job.abort(exc)
        raise
    for row in final_rows:
        row.pop("_path", None)
        row.pop("_checkpoint", None)
    return PruneSummary(
        job_id=job_id, parent_run_id=job.parent_run_id, strategy=strategy.label,
        task=data.task, metric=data.metric, num_layers=job.num_layers, order=outcome.order,
        plan=[list(removed) for _, removed in outcome.plan[1:]],
        candidates=outcome.candidates, search_fine_tunes=outcome.fine_tunes,
        search_equivalents=outcome.equivalents, search_seconds=outcome.seconds,
        finals=final_rows,
        registered_model=registered_name if versions else None, versions=versions,
        computed=job.counts["computed"], reused=job.counts["reused"], seconds=seconds,
        home=str(job.home.root), tracking_uri=job.tracking_uri,
    )
