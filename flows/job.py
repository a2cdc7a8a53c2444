"""What the prune and compare flows share: a job's inputs, its search and its final models.

A ``Job`` is built inside a running flow. It checks the model, prepares the data splits,
and opens the job's MLflow parent run. It then turns a strategy's records into cached
Prefect tasks, child runs and Parquet parts, and runs the final protocol for any set of
(strategy, depth) plans. Strategies that share a candidate or a final model share its
fine-tune: the tasks are cached by what decides their result, not by who asked.
"""

from __future__ import annotations

import dataclasses

import prefect.runtime.flow_run

import glp
from flows.params import FINAL_SEED_BASE, PruneParams, check_model, check_options, model_slug
from flows.search import JobSearch, SearchOutcome, _finite
from glp import GlpError
from glp.core.checkpoint import saved_parameters
from glp.core.hashing import stable_hash
from glp.core.models import (
    model_fingerprint,
)
from glp.core.plan import Plan
from glp.core.provenance import code_fingerprint
from glp.methods import EQUAL_TRAINING, LAYER_METHOD, REFERENCE
from glp.methods.layers.search import (
    Strategy,
)
from tasks import progress
from tasks.analysis import layer_similarity, measure_latencies
from tasks.data import DataRef, is_pair, prepare_data
from tasks.deployment import evaluate_int8, int8_folder
from tasks.home import RunHome
from tasks.locks import JobLock
from tasks.records import (
    final_row,
    record_rows,
    written,
)
from tasks.tracking import (
    FINAL,
    end_job_run,
    log_child_run,
    log_run_metrics,
    start_job_run,
)
from tasks.training import (
    CODE,
    Checkpoint,
    Evaluation,
    FineTuneRequest,
    Teacher,
    evaluate_final,
    fine_tune_final,
    score_candidate,
)


class Job(JobSearch):
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
        """Open the job's parent run, once no other process runs the same job here."""
        progress.clear_stop()
        self.job_id = job_id
        self.lock = JobLock(self.home.root / "locks", job_id)
        self.lock.acquire(self.reporter.note)
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
        try:
            if self.parent_run_id:
                end_job_run(self.tracking_uri, self.parent_run_id,
                            "FAILED" if isinstance(exc, Exception) else "KILLED")
        finally:
            if getattr(self, "lock", None):
                self.lock.release()

    def finish(self, metrics: dict, tags: dict | None = None) -> None:
        """Close the parent run as FINISHED, and let a waiting identical job go on."""
        try:
            end_job_run(self.tracking_uri, self.parent_run_id, "FINISHED", metrics=metrics,
                        tags=tags)
        finally:
            self.lock.release()

    def version_tags(self) -> dict[str, str]:
        """What every registered version of this job records about its inputs."""
        return {"glp.base_model_fingerprint": self.model_fp, "glp.version": glp.__version__,
                "glp.data_fingerprint": self.data_fingerprint,
                "glp.selection_fingerprint": self.data.fingerprints["selection"]}

    @property
    def text_spec(self) -> dict:
        """How a registered version reads text: labels, max length, sentence pairs."""
        return {"labels": self.data.label_names, "max_length": self.finetune.max_length,
                "pair": is_pair(self.data)}

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
                keep_weights: bool = True, teacher: Teacher | None = None,
                epochs: float | None = None) -> FineTuneRequest:
        config = (self.finetune if epochs is None else
                  dataclasses.replace(self.finetune, epochs=epochs))
        return FineTuneRequest(model_path=self.model_path, model_fingerprint=self.model_fp,
                               data=self.data, split=split, removed=removed,
                               config=config, seed=seed, home=self.home,
                               device=self.device, keep_weights=keep_weights,
                               trust_remote_code=self.params.trust_remote_code,
                               teacher=teacher)

    def teacher_checkpoint(self) -> Checkpoint:
        """The teacher of every method that needs one: the unpruned model fine-tuned on the
        whole training split with the first final seed (the reference row's own fine-tune,
        cached)."""
        checkpoint = self._fine_tune_final.submit(
            self.request((), "train", self.seeds[0])).result()
        diverged = checkpoint.diverged or checkpoint.path is None
        if not diverged:  # a finite loss can still leave NaN outputs (one huge step)
            diverged = self._evaluate_final.submit(  # the reference row's own, cached
                checkpoint, self.data, "selection", self.finetune, self.home,
                self.device).result().diverged
        if diverged:
            raise GlpError("the unpruned model's fine-tune (the teacher) diverged; lower --lr "
                           "or turn on clipping (--max-grad-norm)")
        return checkpoint

    def teacher(self) -> Teacher:
        """``--distill``'s teacher (see :meth:`teacher_checkpoint`)."""
        checkpoint = self.teacher_checkpoint()
        return Teacher(path=checkpoint.path, key=checkpoint.key,
                       temperature=self.params.distill_temperature)

    # ------------------------------------------------------------------ finals

    def finals(self, plans: list[tuple[str, str, int, tuple[int, ...]]],
               measure_latency: bool = False, epochs: float | None = None) -> list[dict]:
        """The final protocol for (strategy, variant, depth, removed) entries.

        Every removed set is fine-tuned on the whole training split with each seed
        (``epochs``: for that many epochs instead of ``--epochs``) and evaluated on the dev
        set (the report: never used to choose) and on the selection split (which chooses
        the registered seed and the ``best`` alias), once however many strategies chose
        it. Returns one row per entry and seed (with ``_path`` to the checkpoint), with the
        model's whole training (``train_epochs``, ``train_steps``: a distilled model's
        teacher's included).
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
                    removed, "train", seed, teacher=teacher if distilled else None,
                    epochs=epochs))
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
        own_epochs = self.finetune.epochs if epochs is None else epochs
        taught = ((self.finetune.epochs, self.teacher_checkpoint().steps) if teacher
                  else (0.0, 0))  # a distilled model's teacher trained first
        rows = []
        entries = [(strategy, variant, removed, False) for strategy, variant, _, removed in plans]
        if teacher:
            entries += [(strategy, distilled_variant(variant), removed, True)
                        for strategy, variant, _, removed in plans if removed]
        for strategy, variant, removed, distilled in entries:
            who = {"job_id": self.job_id, "strategy": strategy, "variant": variant,
                   "model": self.params.model, "task": self.data.task,
                   "method": REFERENCE if strategy in (REFERENCE, EQUAL_TRAINING)
                   else LAYER_METHOD}
            for seed in self.seeds:
                job = done_jobs[removed, distilled, seed]
                rows.append(final_row(
                    who, run_id=job["run_id"], parent_run_id=self.parent_run_id,
                    checkpoint=job["checkpoint"], evaluation=job["evaluation"],
                    selection=job["selection"], diverged=job["diverged"],
                    plan=layer_plans[removed], parameters=parameters[removed],
                    encoder_density=density[removed], train_examples=self.data.sizes["train"],
                    reused=job["reused"], latency_ms=latency.get(removed),
                    latency_batch=batch, distilled=distilled,
                    train_epochs=own_epochs + (taught[0] if distilled else 0.0),
                    train_steps=job["checkpoint"].steps + (taught[1] if distilled else 0)))
        self.score_int8(rows)
        return rows

    def score_int8(self, rows: list[dict]) -> None:
        """Each model's dev score as deployed in int8 (``int8_value``): one cached
        ``evaluate-int8`` per model, none for a diverged one."""
        task = evaluate_int8.with_options(result_storage=self.home.results)
        done: dict[str, Evaluation] = {}
        todo = [r for r in rows if not r["diverged"] and r.get("model_dir")]
        if not todo:
            return
        handle = self.reporter.begin("int8", "int8 scores", len(todo))
        for count, row in enumerate(todo):
            checkpoint = row["_checkpoint"]
            if checkpoint.key not in done:
                done[checkpoint.key] = task(checkpoint, self.data, "dev",
                                            self.finetune.max_length, self.home)
            row["int8_value"] = done[checkpoint.key].score
            row["int8_dir"] = str(int8_folder(self.home, done[checkpoint.key].key))
            self.reporter.update(handle, count + 1)
        self.reporter.end(handle)

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
