"""Fine-tune and evaluate tasks: cached on disk, retried, one checkpoint directory each.

The cache key of a fine-tune is built from everything that changes its result: the
model's content hash, the split's content fingerprint, the removed layers, the
fine-tune config and the seed; Prefect adds the task's source code. A finished
fine-tune is therefore never repeated by a re-run, a resumed run or a retry, and a
changed input never reuses a stale result.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import prefect.runtime.flow_run
from prefect import task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from pydantic import BaseModel

import glp
import glp.search
from glp import GlpError
from glp.config import FineTuneConfig, stable_hash
from glp.data import tokenize
from glp.metrics import selection_score
from glp.models import load_classifier, load_tokenizer
from glp.surgery import kept_layers, remove_layers
from glp.train import evaluate, fine_tune
from tasks import faults, progress
from tasks.data import DataRef
from tasks.home import RunHome


class FineTuneRequest(BaseModel, frozen=True):
    """Everything that decides a fine-tune's result (and the paths to find the inputs)."""

    model_path: str
    model_fingerprint: str
    data: DataRef
    split: str  # "fit" for search candidates, "train" for final models
    removed: tuple[int, ...]
    config: FineTuneConfig
    seed: int
    home: RunHome

    @property
    def key(self) -> str:
        return stable_hash(
            "fine-tune",
            glp.__version__,  # the library's code, which the task source does not cover
            self.model_fingerprint,
            self.data.fingerprints[self.split],
            self.data.task,
            self.data.num_labels,
            sorted(self.removed),
            self.config,
            self.seed,
        )


class Checkpoint(BaseModel, frozen=True):
    """A fine-tuned model on disk and how it was made."""

    key: str
    path: str
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    seed: int
    steps: int
    examples: int
    seconds: float
    final_loss: float
    flow_run_id: str | None  # the run that computed it: tells computed from reused


class Evaluation(BaseModel, frozen=True):
    """Scores of one checkpoint on one split."""

    key: str
    checkpoint_key: str
    split: str
    metric: str
    score: float
    metrics: dict[str, float]
    examples: int
    seconds: float
    flow_run_id: str | None


def _current_flow_run() -> str | None:
    run_id = prefect.runtime.flow_run.id
    return str(run_id) if run_id else None


def tokenized(data: DataRef, split: str, tokenizer_path: str, max_length: int, home: RunHome):
    """The split tokenised, cached per (rows, tokenizer definition, max length)."""
    tokenizer = load_tokenizer(tokenizer_path)
    tokens = tokenize(
        data.load(split), tokenizer, max_length=max_length, cache_dir=home.token_cache
    )
    return tokens, tokenizer


def run_fine_tune(request: FineTuneRequest, kind: str) -> Checkpoint:
    """Fresh pre-trained weights, layers removed, fine-tuned, saved atomically."""
    faults.inject("fine-tune")
    progress.check_stop()  # queued behind an interrupted one: do not start
    removed = ",".join(map(str, request.removed)) or "none"
    label = f"  {kind[:-1]}: layers {removed} removed, seed {request.seed}"
    dataset, tokenizer = tokenized(
        request.data, request.split, request.model_path, request.config.max_length, request.home
    )
    model = load_classifier(
        request.model_path,
        num_labels=request.data.num_labels,
        is_regression=request.data.is_regression,
        seed=request.seed,
    )
    if request.data.label_names:  # readable predictions: the task's own label values
        model.config.id2label = dict(enumerate(request.data.label_names))
        model.config.label2id = {name: i for i, name in enumerate(request.data.label_names)}
    remove_layers(model, request.removed)
    on_step, close = progress.step_callback(label)
    try:
        stats = fine_tune(model, dataset, request.config, seed=request.seed, on_step=on_step)
    finally:
        close()
    target = request.home.artifacts / kind / request.key
    # Write beside the target and rename: a crash never leaves a half-written checkpoint.
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return Checkpoint(
        key=request.key,
        path=str(target),
        removed=tuple(sorted(request.removed)),
        kept=tuple(kept_layers(model)),
        seed=request.seed,
        steps=stats.steps,
        examples=stats.examples,
        seconds=round(stats.seconds, 3),
        final_loss=stats.final_loss,
        flow_run_id=_current_flow_run(),
    )


def run_evaluation(checkpoint: Checkpoint, data: DataRef, split: str, config: FineTuneConfig,
                   home: RunHome) -> Evaluation:
    """Score a checkpoint on a split with every metric of the task."""
    faults.inject("evaluate")
    path = Path(checkpoint.path)
    if not path.is_dir():
        raise GlpError(f"checkpoint {path} is missing; delete the run home's prefect/results "
                       "to recompute, or restore the artifacts folder")
    start = time.perf_counter()
    dataset, _ = tokenized(data, split, str(path), config.max_length, home)
    model = load_classifier(path, num_labels=data.num_labels, is_regression=data.is_regression)
    metrics = evaluate(model, dataset, is_regression=data.is_regression,
                       batch_size=config.eval_batch_size)
    return Evaluation(
        key=stable_hash("evaluate", checkpoint.key, data.fingerprints[split]),
        checkpoint_key=checkpoint.key,
        split=split,
        metric=data.metric,
        score=selection_score(metrics, data.metric),
        metrics=metrics,
        examples=len(dataset),
        seconds=round(time.perf_counter() - start, 3),
        flow_run_id=_current_flow_run(),
    )


def _request_key(context, parameters) -> str:
    """The ``request`` parameter's own key: everything that decides the task's result."""
    return parameters["request"].key


def _evaluation_key(context, parameters) -> str:
    checkpoint, data = parameters["checkpoint"], parameters["data"]
    split = parameters["split"]
    return stable_hash("evaluate", checkpoint.key, data.fingerprints[split], data.metric)


# TASK_SOURCE joins the key: a change to the task's code invalidates its cached results.
REQUEST_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_request_key)
EVALUATION_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_evaluation_key)
CACHED = {"persist_result": True, "result_serializer": "json", "retries": 2,
           "retry_delay_seconds": 1}


@task(name="fine-tune-candidate", cache_policy=REQUEST_CACHE, **CACHED)
def fine_tune_candidate(request: FineTuneRequest) -> Checkpoint:
    """Fine-tune one search candidate on the 85% split."""
    return run_fine_tune(request, "candidates")


@task(name="evaluate-candidate", cache_policy=EVALUATION_CACHE, **CACHED)
def evaluate_candidate(checkpoint: Checkpoint, data: DataRef, split: str,
                       config: FineTuneConfig, home: RunHome) -> Evaluation:
    """Score one search candidate on the 15% selection split."""
    return run_evaluation(checkpoint, data, split, config, home)


@task(name="fine-tune-final", cache_policy=REQUEST_CACHE, **CACHED)
def fine_tune_final(request: FineTuneRequest) -> Checkpoint:
    """Fine-tune a final model (one depth, one seed) on the whole training split."""
    return run_fine_tune(request, "finals")


@task(name="evaluate-final", cache_policy=EVALUATION_CACHE, **CACHED)
def evaluate_final(checkpoint: Checkpoint, data: DataRef, split: str,
                   config: FineTuneConfig, home: RunHome) -> Evaluation:
    """Score a final model on the task's dev set."""
    return run_evaluation(checkpoint, data, split, config, home)


@task(name="select-layer", cache_policy=NO_CACHE)
def select_layer(candidates: list[tuple[int, float]]) -> int:
    """The layer to remove next (best score; ties go to the highest index)."""
    return glp.search.select_layer(candidates)
