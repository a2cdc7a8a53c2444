"""Fine-tune and evaluate tasks: cached on disk, retried.

The cache key of a fine-tune is built from everything that changes its result: the
model's content hash, the split's content fingerprint, the removed layers, the
fine-tune settings that change weights (not ``eval_batch_size``), the seed, the device
type, and the code that runs it: the source of this module and of every glp and tasks
module it imports, with the torch and transformers versions
(:func:`glp.core.provenance.code_fingerprint`). A finished fine-tune is therefore never
repeated by a re-run, a resumed run or a retry, and neither a changed input nor a
changed library reuses a stale result.

A search candidate is fine-tuned and scored in one task and keeps no weights (its result
is its metrics; ``keep_weights`` keeps them). Final models are saved as checkpoints.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import threading
import time
from pathlib import Path

import prefect.runtime.flow_run
from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from pydantic import BaseModel

from glp import GlpError
from glp.core.anatomy import kept_layers
from glp.core.checkpoint import load_pretrained, read_plan, save_pretrained
from glp.core.hashing import stable_hash
from glp.core.models import load_classifier, load_tokenizer, strip_remote_code
from glp.core.provenance import code_fingerprint
from glp.core.surgery import remove_layers
from glp.training.config import FineTuneConfig
from glp.training.data import tokenize
from glp.training.distill import distil_layers
from glp.training.metrics import selection_score
from glp.training.train import evaluate, fine_tune
from tasks import faults, progress
from tasks.data import DataRef, read_split
from tasks.home import RunHome

CODE = "tasks.training"
"""The module whose source closure keys every fine-tune and evaluation."""


class NoSpace(GlpError):
    """The run home's disk is full: retrying cannot help, so the task is not retried."""


class Teacher(BaseModel, frozen=True):
    """The model a final fine-tune distils from (``--distill``): a saved fine-tuned model."""

    path: str
    key: str  # its checkpoint's key: a different teacher is a different fine-tune
    temperature: float = 2.0


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
    device: str = "cpu"  # a resolved device ("cpu", "cuda:0"); its type is in the key
    keep_weights: bool = True  # not in the key: it changes what is kept, not the result
    trust_remote_code: bool = False  # the user's explicit --trust-remote-code
    teacher: Teacher | None = None  # distil from it (the loss), else the task loss alone

    @property
    def key(self) -> str:
        distilled = (("distill", self.teacher.key, self.teacher.temperature)
                     if self.teacher else ())  # no teacher: the keys stay what they were
        return stable_hash(
            "fine-tune",
            code_fingerprint(CODE),  # the library's code, which the task source does not cover
            self.model_fingerprint,
            self.data.fingerprints[self.split],
            self.data.task,
            self.data.num_labels,
            sorted(self.removed),
            self.config.result_dict(),
            self.seed,
            self.device.partition(":")[0],
            *distilled,
        )


class Checkpoint(BaseModel, frozen=True):
    """A fine-tuned model (on disk unless ``path`` is None) and how it was made."""

    key: str
    path: str | None  # None: a candidate whose weights were not kept
    base_path: str  # the pre-trained model (its tokenizer reads every split)
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    seed: int
    steps: int
    examples: int
    seconds: float
    final_loss: float
    diverged: bool  # a loss was NaN/inf: never selected, never registered
    device: str
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
    diverged: bool = False  # the fine-tune diverged or a metric is not finite


class Scored(BaseModel, frozen=True):
    """A search candidate: how it was fine-tuned and how it scored."""

    checkpoint: Checkpoint
    evaluation: Evaluation

    @property
    def score(self) -> float:
        return self.evaluation.score

    @property
    def loss(self) -> float:
        """The selection loss (successive halving breaks ties of the score by it)."""
        return self.evaluation.metrics.get("loss", float("nan"))


def _current_flow_run() -> str | None:
    run_id = prefect.runtime.flow_run.id
    return str(run_id) if run_id else None


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    return load_tokenizer(path)


@functools.lru_cache(maxsize=8)
def _tokenized(split_path: str, split_fingerprint: str, tokenizer_path: str, max_length: int,
               cache_dir: str):
    return tokenize(read_split(split_path), _tokenizer(tokenizer_path), max_length=max_length,
                    cache_dir=Path(cache_dir))


_TOKENIZING = threading.Lock()  # one fast tokenizer is not safe to share across threads


def tokenized(data: DataRef, split: str, tokenizer_path: str, max_length: int, home: RunHome):
    """The split tokenised, once per process and job: later candidates and evaluations of
    the job reuse the same in-memory rows (keyed by the split's content fingerprint)."""
    if split not in data.paths:
        raise GlpError(f"unknown split '{split}'; choose one of: {', '.join(data.paths)}")
    with _TOKENIZING:
        tokens = _tokenized(data.paths[split], data.fingerprints[split], str(tokenizer_path),
                            max_length, str(home.token_cache))
        return tokens, _tokenizer(str(tokenizer_path))


def _train(request: FineTuneRequest, kind: str):
    """Fresh pre-trained weights, layers removed, fine-tuned: (model, stats)."""
    faults.inject("fine-tune")
    progress.check_stop()  # queued behind an interrupted one: do not start
    removed = ",".join(map(str, request.removed)) or "none"
    label = f"  {kind}: layers {removed} removed, seed {request.seed}"
    dataset, _ = tokenized(request.data, request.split, request.model_path,
                           request.config.max_length, request.home)
    model = load_classifier(
        request.model_path,
        num_labels=request.data.num_labels,
        is_regression=request.data.is_regression,
        seed=request.seed,
        trust_remote_code=request.trust_remote_code,
    )
    strip_remote_code(model.config)  # glp's outputs never ask to run custom code
    if request.data.label_names:  # readable predictions: the task's own label values
        model.config.id2label = dict(enumerate(request.data.label_names))
        model.config.label2id = {name: i for i, name in enumerate(request.data.label_names)}
    remove_layers(model, request.removed)
    teacher = request.teacher
    if teacher is not None:
        label += f", distilled at T={teacher.temperature:g}"
        if not Path(teacher.path).is_dir():
            raise GlpError(f"the teacher checkpoint {teacher.path} is missing; delete the "
                           "run home's prefect/results to recompute, or restore the artifacts "
                           "folder")
        teacher_model = load_trained(teacher.path, request.data)
    on_step, close = progress.step_callback(label)
    try:
        if teacher is None:
            stats = fine_tune(model, dataset, request.config, seed=request.seed,
                              on_step=on_step, device=request.device)
        else:
            stats = distil_layers(model, teacher_model, dataset, request.config,
                                  seed=request.seed, temperature=teacher.temperature,
                                  device=request.device, on_step=on_step)
    finally:
        close()
    return model, stats


def save_atomically(model, tokenizer, target: Path) -> None:
    """Write beside the target and rename: a crash never leaves a half-written checkpoint.

    Raises:
        NoSpace: the disk is full (named with the home and the space the model needs).
    """
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, tokenizer)  # safetensors + the plan (glp_plan.json)
    except Exception as exc:  # safetensors' writer raises SafetensorError, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if faults.is_full_disk(exc):
            need = sum(p.numel() * p.element_size() for p in model.parameters())
            home = target.parents[2]  # <home>/artifacts/<kind>/<key>
            free = shutil.disk_usage(target.parent).free
            raise NoSpace(f"no space left on the device of the run home {home} "
                          f"({free / 1e6:,.0f} MB free; a checkpoint of this model needs "
                          f"about {need / 1e6:,.0f} MB): free some space (glp gc --home "
                          f"{shlex.quote(str(home))} removes what no run needs) and run the "
                          "same command again; finished work is kept") from None
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _checkpoint(request: FineTuneRequest, model, stats, path: Path | None) -> Checkpoint:
    return Checkpoint(
        key=request.key,
        path=str(path) if path else None,
        base_path=request.model_path,
        removed=tuple(sorted(request.removed)),
        kept=tuple(kept_layers(model)),
        seed=request.seed,
        steps=stats.steps,
        examples=stats.examples,
        seconds=round(stats.seconds, 3),
        final_loss=stats.final_loss,
        diverged=stats.diverged,
        device=stats.device,
        flow_run_id=_current_flow_run(),
    )


def run_fine_tune(request: FineTuneRequest, kind: str) -> Checkpoint:
    """A final model: fine-tuned and saved (safetensors) under artifacts/<kind>/<key>."""
    model, stats = _train(request, kind[:-1])
    target = request.home.artifacts / kind / request.key
    save_atomically(model, _tokenizer(request.model_path), target)
    return _checkpoint(request, model, stats, target)


def _score(model, checkpoint: Checkpoint, data: DataRef, split: str, config: FineTuneConfig,
           home: RunHome, device: str) -> Evaluation:
    start = time.perf_counter()
    dataset, _ = tokenized(data, split, checkpoint.base_path, config.max_length, home)
    metrics = evaluate(model, dataset, is_regression=data.is_regression,
                       batch_size=config.eval_batch_size, device=device)
    score = selection_score(metrics, data.metric)
    return Evaluation(
        key=stable_hash("evaluate", checkpoint.key, data.fingerprints[split]),
        checkpoint_key=checkpoint.key,
        split=split,
        metric=data.metric,
        score=score,
        metrics=metrics,
        examples=len(dataset),
        seconds=round(time.perf_counter() - start, 3),
        flow_run_id=_current_flow_run(),
        diverged=checkpoint.diverged or score != score,
    )


def run_candidate(request: FineTuneRequest, split: str) -> Scored:
    """A search candidate: fine-tuned, scored on ``split`` in memory, and its weights kept
    only when ``request.keep_weights`` (its result is its metrics)."""
    model, stats = _train(request, "candidate")
    path = None
    if request.keep_weights:
        path = request.home.artifacts / "candidates" / request.key
        save_atomically(model, _tokenizer(request.model_path), path)
    checkpoint = _checkpoint(request, model, stats, path)
    faults.inject("evaluate")
    evaluation = _score(model, checkpoint, request.data, split, request.config,
                        request.home, request.device)
    return Scored(checkpoint=checkpoint, evaluation=evaluation)


def load_trained(path: str, data: DataRef):
    """A saved fine-tuned model: rebuilt from its plan when it was cut in width."""
    plan = read_plan(path)
    if plan is not None and not plan.is_layers_only:
        return load_pretrained(path)
    return load_classifier(path, num_labels=data.num_labels, is_regression=data.is_regression)


def run_evaluation(checkpoint: Checkpoint, data: DataRef, split: str, config: FineTuneConfig,
                   home: RunHome, device: str | None = None) -> Evaluation:
    """Score a saved checkpoint on a split with every metric of the task, on ``device``
    (the run's; by default the one it was trained on)."""
    faults.inject("evaluate")
    if checkpoint.path is None or not Path(checkpoint.path).is_dir():
        raise GlpError(f"checkpoint {checkpoint.path} is missing; delete the run home's "
                       "prefect/results to recompute, or restore the artifacts folder")
    model = load_trained(checkpoint.path, data)
    return _score(model, checkpoint, data, split, config, home, device or checkpoint.device)


def _request_key(context, parameters) -> str:
    """The ``request`` parameter's own key: everything that decides the task's result."""
    return parameters["request"].key


def _candidate_key(context, parameters) -> str:
    request, split = parameters["request"], parameters["split"]
    return stable_hash("candidate", request.key, request.data.fingerprints[split],
                       request.data.metric)


def _evaluation_key(context, parameters) -> str:
    checkpoint, data = parameters["checkpoint"], parameters["data"]
    split = parameters["split"]
    return stable_hash("evaluate", checkpoint.key, data.fingerprints[split], data.metric,
                       code_fingerprint(CODE))


# TASK_SOURCE joins the key: a change to the task's code invalidates its cached results.
REQUEST_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_request_key)
CANDIDATE_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_candidate_key)
EVALUATION_CACHE = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_evaluation_key)
CACHED = {"persist_result": True, "result_serializer": "json", "retries": 2,
          "retry_delay_seconds": 1, "retry_condition_fn": faults.retry_unless_hopeless}


@task(name="score-candidate", cache_policy=CANDIDATE_CACHE, **CACHED)
def score_candidate(request: FineTuneRequest, split: str) -> Scored:
    """Fine-tune one search candidate on the 85% split and score it on ``split`` (the 15%
    selection split), in one task: no checkpoint is written unless asked for."""
    return run_candidate(request, split)


@task(name="fine-tune-final", cache_policy=REQUEST_CACHE, **CACHED)
def fine_tune_final(request: FineTuneRequest) -> Checkpoint:
    """Fine-tune a final model (one depth, one seed) on the whole training split."""
    return run_fine_tune(request, "finals")


@task(name="evaluate-final", cache_policy=EVALUATION_CACHE, **CACHED)
def evaluate_final(checkpoint: Checkpoint, data: DataRef, split: str,
                   config: FineTuneConfig, home: RunHome, device: str | None = None
                   ) -> Evaluation:
    """Score a final model on a split: the dev set (the report) or the selection split
    (which chooses the registered seed and the ``best`` alias)."""
    return run_evaluation(checkpoint, data, split, config, home, device)
