"""A job's search: a layer strategy's records turned into cached candidate fine-tunes,
MLflow child runs and Parquet rows (the part of :class:`flows.job.Job` that searches)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from glp import GlpError
from glp.core.hashing import stable_hash
from glp.methods.layers.search import (
    FULL,
    Budget,
    CandidateScored,
    LayerScored,
    LayerSelected,
    Strategy,
    SubsetChosen,
    plan_of,
    removal_order,
)
from tasks.analysis import SimilarityRequest
from tasks.records import (
    candidate_row,
    record_rows,
    score_row,
    selection_row,
)
from tasks.search import select_layer
from tasks.tracking import (
    CANDIDATE,
    log_child_run,
)
from tasks.training import (
    Checkpoint,
    Scored,
)


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


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """The finite metrics (MLflow would store a diverged model's NaN as a number)."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


class JobSearch:
    """The search half of a :class:`flows.job.Job` (its inputs, home and tasks are set by
    ``Job.__init__``)."""

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
                self._check_not_all_diverged(label, iteration, records)
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

    def _check_not_all_diverged(self, label: str, iteration: int, records: list) -> None:
        """Raises GlpError when every candidate this iteration chose from diverged: the
        choice would be arbitrary, and so would every model after it."""
        scored = [r for r in records if isinstance(r, CandidateScored)
                  and r.iteration == iteration]
        if scored and all(r.result.evaluation.diverged for r in scored):
            raise GlpError(
                f"every candidate of {label} iteration {iteration + 1} diverged (a NaN or "
                f"infinite training loss or output), so there is nothing to choose from; "
                f"lower --lr ({self.finetune.learning_rate:g})")

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

