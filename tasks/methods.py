"""The one task every compression method runs through: ``compress-model``, cached and retried.

A request names a registered method (:mod:`glp.methods`), its parameters and the model to
start from (a fine-tuned checkpoint, which is also the distillation teacher). The task
loads that model (and, if the method needs them, a teacher copy and the tokenized splits),
calls the method's ``run``, and saves the result (safetensors + ``glp_plan.json`` +
tokenizer, and ``glp_codes.safetensors`` for coded weights) under
``artifacts/compressed/<key>``. The key holds everything that decides the result: the
method's name and parameters, the starting model's key, the data it reads, the fine-tune
settings, the seed, the device type, and the code — this module and the method's own
module (:func:`glp.core.provenance.code_fingerprint`), so that editing one method
recomputes that method's models and no other's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from pydantic import BaseModel

from glp import GlpError
from glp.core.hashing import stable_hash
from glp.core.plan import Plan
from glp.core.provenance import code_fingerprint
from glp.methods import Context, Method, get_method
from glp.training.config import FineTuneConfig
from glp.training.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS
from tasks import faults, progress
from tasks.data import DataRef
from tasks.home import RunHome
from tasks.training import (
    CACHED,
    Checkpoint,
    Evaluation,
    _current_flow_run,
    _tokenizer,
    save_atomically,
    tokenized,
)

CODE = "tasks.methods"
"""The module whose source closure, with the method's module, keys every compression."""

SPLITS = ("train", "selection")
"""The needs that read a split of the same name (the method trains on ``train`` and scores
on ``selection``); their fingerprints are in the key."""


def method_fingerprint(method: Method) -> str:
    """The code that computes a method's models: this module's closure and the method's."""
    return code_fingerprint(CODE, method.module)


class MethodRequest(BaseModel, frozen=True):
    """Everything that decides a compressed model."""

    source: Checkpoint  # the fine-tuned model to compress, also the distillation teacher
    data: DataRef
    config: FineTuneConfig  # learning rate, batch size, max length (epochs: the method's)
    method: str
    params: dict  # the method's parameters (its params dataclass, as a dict)
    seed: int
    home: RunHome
    device: str = "cpu"

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    @property
    def settings(self):
        return self.spec.params(**self.params)

    def key(self) -> str:
        spec = self.spec
        splits = sorted(n for n in spec.needs if n in SPLITS)
        return stable_hash("compress-model", method_fingerprint(spec), self.source.key,
                           [self.data.fingerprints[s] for s in splits], self.data.metric,
                           self.data.is_regression, self.method, self.config.result_dict(),
                           dataclasses.asdict(self.settings), self.seed,
                           self.device.partition(":")[0])


class Compressed(BaseModel, frozen=True):
    """A compressed model on disk (as a checkpoint), its plan and what each phase did."""

    checkpoint: Checkpoint
    plan: str  # JSON
    phases: list[dict]  # per phase: steps, seconds, final loss, diverged
    details: dict = {}  # what the method reports besides (e.g. MLPruning's threshold shift)

    @property
    def plan_object(self) -> Plan:
        return Plan.from_json(self.plan)


def load_checkpoint(path: str | None, what: str):
    """A saved model, or a GlpError that says how to recover when it is gone."""
    from glp.core.checkpoint import load_pretrained

    if path is None or not Path(path).is_dir():
        raise GlpError(f"the {what} checkpoint {path} is missing; delete the run home's "
                       "prefect/results to recompute, or restore the artifacts folder")
    return load_pretrained(path)


def load_pretrained_student(request: MethodRequest, model):
    """The pre-trained model the source was fine-tuned from, with a new task head like the
    source's (seeded by the request's seed) and the source's removed layers removed.

    Raises GlpError when the source is a given fine-tuned model: which pre-trained model
    it came from is not known then.
    """
    from glp.core.models import load_classifier
    from glp.core.surgery import remove_layers

    source = request.source
    if source.base_path == source.path:
        raise GlpError(f"the model {source.path} was given fine-tuned, so the pre-trained "
                       "model it came from is unknown: give --model the pre-trained encoder "
                       "(glp fine-tunes it first)")
    student = load_classifier(source.base_path, num_labels=model.config.num_labels,
                              is_regression=request.data.is_regression, seed=request.seed)
    return remove_layers(student, source.removed) if source.removed else student


def _context(request: MethodRequest, model) -> Context:
    spec, data = request.spec, request.data
    base = request.source.base_path

    def split(name: str):
        return tokenized(data, name, base, request.config.max_length, request.home)[0]

    def score(candidate) -> float:
        from glp.training.metrics import selection_score
        from glp.training.train import evaluate

        metrics = evaluate(candidate, context.selection, is_regression=data.is_regression,
                           batch_size=max(request.config.batch_size, 64))
        return selection_score(metrics, data.metric)

    def step_callback(label: str):
        return progress.step_callback(f"  {label}, seed {request.seed}")

    def pretrained():
        return load_pretrained_student(request, model)

    uses = spec.needs
    context = Context(
        model=model, config=request.config, seed=request.seed, device=request.device,
        is_regression=data.is_regression,
        teacher=(lambda: load_checkpoint(request.source.path, "teacher's"))
        if "teacher" in uses else None,
        pretrained=pretrained if "pretrained" in uses else None,
        load_train=(lambda: split("train")) if "train" in uses else None,
        load_selection=(lambda: split("selection")) if "selection" in uses else None,
        score=score if "selection" in uses else None, progress=step_callback)
    return context


def run_compress_model(request: MethodRequest) -> Compressed:
    """Load the source model, run the method on it, save the result (unless diverged)."""
    faults.inject("fine-tune")
    progress.check_stop()
    from glp.core.anatomy import kept_layers
    from glp.core.plan import plan_of_model

    started = time.perf_counter()
    spec, key = request.spec, request.key()
    model = load_checkpoint(request.source.path, "input model's")
    broken = [name for name, p in model.named_parameters() if not p.isfinite().all()]
    if broken:  # a diverged input: nothing to compress, and never registered
        raise GlpError(f"the input model has non-finite weights in {', '.join(broken[:4])}; "
                       "compress a model that trained without diverging")
    from glp.training.train import resolve_device

    model.to(resolve_device(request.device))
    outcome = spec.implementation()(_context(request, model), request.settings)
    model = outcome.model
    model.glp_plan = outcome.plan if not outcome.diverged else plan_of_model(model)
    model.to("cpu")
    path = None
    if not outcome.diverged:
        path = request.home.artifacts / "compressed" / key
        save_atomically(model, _tokenizer(request.source.base_path), path)
    phases = outcome.phases
    checkpoint = Checkpoint(
        key=key, path=str(path) if path else None, base_path=request.source.base_path,
        removed=tuple(outcome.plan.removed), kept=tuple(kept_layers(model)),
        seed=request.seed, steps=sum(p["steps"] for p in phases),
        examples=request.data.sizes["train" if "train" in spec.needs else "selection"],
        seconds=round(sum(p["seconds"] for p in phases) if "train" in spec.needs
                      else time.perf_counter() - started, 3),
        final_loss=phases[-1]["final_loss"] if phases else 0.0, diverged=outcome.diverged,
        device=request.device, flow_run_id=_current_flow_run())
    return Compressed(checkpoint=checkpoint, plan=outcome.plan.to_json(), phases=phases,
                      details=outcome.details)


def not_evaluated(checkpoint: Checkpoint, data: DataRef, split: str) -> Evaluation:
    """The scores of a model that diverged before it could be evaluated: NaN, diverged."""
    names = REGRESSION_METRICS if data.is_regression else CLASSIFICATION_METRICS
    return Evaluation(key=stable_hash("not-evaluated", checkpoint.key, split),
                      checkpoint_key=checkpoint.key, split=split, metric=data.metric,
                      score=float("nan"), metrics=dict.fromkeys(names, float("nan")),
                      examples=0, seconds=0.0, flow_run_id=_current_flow_run(), diverged=True)


def _key(context, parameters) -> str:
    return parameters["request"].key()


@task(name="compress-model", cache_policy=TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_key),
      **CACHED)
def compress_model(request: MethodRequest) -> Compressed:
    """Compress one model with one registered method, at one size and seed."""
    return run_compress_model(request)
