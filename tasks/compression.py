"""Width-compression tasks (MLPruning): cached on disk, retried, one per phase.

``prune-width`` trains the head and neuron masks from the fine-tuned teacher with
distillation and slices the model to its plan; ``fine-tune-compressed`` distils the sliced
model briefly (and, with level 3, trains its block masks). Each saves a model directory
(safetensors + ``glp_plan.json`` + tokenizer) under ``artifacts/pruned/<key>`` or
``artifacts/compressed/<key>``, and each
is keyed by everything that decides its result: the teacher's key, the data, the settings,
the budget, the seed, the device type and the code (:func:`glp.core.provenance.code_fingerprint`
of this module's closure), so a re-run or a resumed run repeats no finished phase.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from pydantic import BaseModel

from glp import GlpError
from glp.core.anatomy import kept_layers
from glp.core.checkpoint import load_pretrained
from glp.core.hashing import stable_hash
from glp.core.plan import Plan
from glp.core.provenance import code_fingerprint
from glp.methods import grain
from glp.methods.grain import GrainConfig
from glp.methods.mlpruning import (
    MLPruningConfig,
    distil,
    train_block_masks,
    train_width_masks,
    with_blocks,
)
from glp.training.config import FineTuneConfig
from glp.training.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS
from tasks import faults, progress
from tasks.data import DataRef
from tasks.home import RunHome
from tasks.training import (
    CACHED,
    Checkpoint,
    Evaluation,
    NoSpace,
    _current_flow_run,
    save_atomically,
    tokenized,
)

CODE = "tasks.compression"
"""The module whose source closure keys every compression phase."""

__all__ = ["CompressRequest", "Compressed", "NoSpace", "fine_tune_compressed", "prune_width"]


class CompressRequest(BaseModel, frozen=True):
    """Everything that decides a compression's result."""

    teacher: Checkpoint  # the fine-tuned unpruned model: the starting point and the teacher
    data: DataRef
    split: str  # the split the method trains on ("train")
    config: FineTuneConfig  # learning rate, batch size, max length (epochs per phase below)
    method: str
    method_config: dict  # MLPruningConfig fields (density, block size, ...)
    seed: int
    home: RunHome
    device: str = "cpu"

    @property
    def settings(self) -> MLPruningConfig | GrainConfig:
        if self.method == "grain":
            return GrainConfig(**self.method_config)
        return MLPruningConfig(**self.method_config)

    def key(self, phase: str) -> str:
        """The phase's cache key: only the settings it depends on (block settings do not
        recompute the masks phase)."""
        return stable_hash(phase, code_fingerprint(CODE), self.teacher.key,
                           self.data.fingerprints[self.split], self.method,
                           self.config.result_dict(), self._phase_settings(phase),
                           self.seed, self.device.partition(":")[0])


    def _phase_settings(self, phase: str) -> dict:
        settings = self.settings
        if isinstance(settings, GrainConfig):  # one phase: everything decides it
            return dataclasses.asdict(settings)
        return settings.phase_settings(phase)


class Compressed(BaseModel, frozen=True):
    """A compressed model on disk (as a checkpoint), its plan and what each phase did."""

    checkpoint: Checkpoint
    plan: str  # JSON
    phases: list[dict]  # per phase: steps, seconds, final loss, diverged
    threshold_shift: float  # the common shift that put the plan at the budget
    remaining_after_training: float  # the kept fraction the thresholds reached themselves

    @property
    def plan_object(self) -> Plan:
        return Plan.from_json(self.plan)


def _load(path: str | None, what: str):
    if path is None or not Path(path).is_dir():
        raise GlpError(f"the {what} checkpoint {path} is missing; delete the run home's "
                       "prefect/results to recompute, or restore the artifacts folder")
    return load_pretrained(path)


def _load_teacher(request: CompressRequest):
    return _load(request.teacher.path, "teacher's")


def _phase_record(name: str, stats) -> dict:
    return {"phase": name, "steps": stats.steps, "seconds": round(stats.seconds, 3),
            "final_loss": stats.final_loss, "diverged": stats.diverged}


def _save(model, request: CompressRequest, kind: str, key: str) -> Path:
    from tasks.training import _tokenizer

    target = request.home.artifacts / kind / key
    save_atomically(model, _tokenizer(request.teacher.base_path), target)
    return target


def _result(request, key, model, path, phases, shift, remaining, diverged,
            plan: Plan | None = None) -> Compressed:
    seconds = sum(p["seconds"] for p in phases)
    checkpoint = Checkpoint(
        key=key, path=str(path) if path else None, base_path=request.teacher.base_path,
        removed=(), kept=tuple(kept_layers(model)), seed=request.seed,
        steps=sum(p["steps"] for p in phases),
        examples=request.data.sizes[request.split], seconds=round(seconds, 3),
        final_loss=phases[-1]["final_loss"], diverged=diverged, device=request.device,
        flow_run_id=_current_flow_run())
    from glp.core.plan import plan_of_model

    plan = plan or plan_of_model(model)
    return Compressed(checkpoint=checkpoint, plan=plan.to_json(),
                      phases=phases, threshold_shift=shift,
                      remaining_after_training=remaining)


def run_prune_width(request: CompressRequest) -> Compressed:
    faults.inject("fine-tune")
    progress.check_stop()
    settings = request.settings
    key = request.key("prune-width")
    dataset, _ = tokenized(request.data, request.split, request.teacher.base_path,
                           request.config.max_length, request.home)
    teacher = _load_teacher(request)
    model = _load_teacher(request)  # the student starts as a copy of the teacher
    if request.method == "grain":
        return _grain(request, key, model, teacher, dataset)
    on_step, close = progress.step_callback(
        f"  {request.method} density {settings.density}: masks, seed {request.seed}")
    try:
        result = train_width_masks(model, teacher, dataset, request.config, settings,
                                   seed=request.seed, device=request.device, on_step=on_step)
    finally:
        close()
    stats = result.stats["heads+neurons"]
    path = None if stats.diverged else _save(model, request, "pruned", key)
    # A diverged run is not sliced; its row still says which plan it was heading for.
    return _result(request, key, model, path, [_phase_record("heads+neurons", stats)],
                   result.shift, result.remaining_after_training, stats.diverged, result.plan)


def _grain(request: CompressRequest, key: str, model, teacher, dataset) -> Compressed:
    settings = request.settings
    on_step, close = progress.step_callback(
        f"  grain density {settings.density}: prune + distil, seed {request.seed}")
    try:
        result = grain.prune(model, teacher, dataset, request.config, settings,
                             seed=request.seed, device=request.device, on_step=on_step)
    finally:
        close()
    stats = result.stats["grain"]
    path = None if stats.diverged else _save(model, request, "pruned", key)
    return _result(request, key, model, path, [_phase_record("grain", stats)], 0.0,
                   result.density_reached, stats.diverged, result.plan)


def run_fine_tune_compressed(request: CompressRequest, pruned: Compressed) -> Compressed:
    faults.inject("fine-tune")
    progress.check_stop()
    settings = request.settings
    key = request.key("fine-tune-compressed")
    # GRAIN trains the pruned model within its one run: nothing is left to do here.
    nothing_to_do = not getattr(settings, "final_epochs", 0) and not getattr(
        settings, "block_size", 0)
    if pruned.checkpoint.diverged or nothing_to_do:  # the pruned model is the result
        return pruned.model_copy(update={"checkpoint": pruned.checkpoint.model_copy(
            update={"key": key})})
    model = _load(pruned.checkpoint.path, "pruned model's")
    dataset, _ = tokenized(request.data, request.split, request.teacher.base_path,
                           request.config.max_length, request.home)
    teacher = _load_teacher(request)
    phases = list(pruned.phases)
    label = f"  {request.method} density {settings.density}"
    if settings.final_epochs:
        on_step, close = progress.step_callback(f"{label}: fine-tune, seed {request.seed}")
        try:
            stats = distil(model, teacher, dataset, request.config, settings,
                           seed=request.seed + 1, device=request.device, on_step=on_step)
        finally:
            close()
        phases.append(_phase_record("fine-tune", stats))
    if settings.block_size and not any(p["diverged"] for p in phases):
        on_step, close = progress.step_callback(f"{label}: blocks, seed {request.seed}")
        try:
            masks, stats = train_block_masks(model, teacher, dataset, request.config,
                                             settings, seed=request.seed + 2,
                                             device=request.device, on_step=on_step)
        finally:
            close()
        model.glp_plan = with_blocks(pruned.plan_object, masks)
        phases.append(_phase_record("blocks", stats))
    diverged = any(p["diverged"] for p in phases)
    path = None if diverged else _save(model, request, "compressed", key)
    return _result(request, key, model, path, phases, pruned.threshold_shift,
                   pruned.remaining_after_training, diverged)


def not_evaluated(checkpoint: Checkpoint, data: DataRef, split: str) -> Evaluation:
    """The scores of a model that diverged before it could be evaluated: NaN, diverged."""
    names = REGRESSION_METRICS if data.is_regression else CLASSIFICATION_METRICS
    return Evaluation(key=stable_hash("not-evaluated", checkpoint.key, split),
                      checkpoint_key=checkpoint.key, split=split, metric=data.metric,
                      score=float("nan"), metrics=dict.fromkeys(names, float("nan")),
                      examples=0, seconds=0.0, flow_run_id=_current_flow_run(), diverged=True)


def _phase_key(phase: str):
    def key(context, parameters) -> str:
        return parameters["request"].key(phase)
    return key


@task(name="prune-width", cache_policy=TASK_SOURCE + CacheKeyFnPolicy(
    cache_key_fn=_phase_key("prune-width")), **CACHED)
def prune_width(request: CompressRequest) -> Compressed:
    """MLPruning levels 1-2: masked distillation training of heads and FFN neurons from the
    teacher, sliced to the plan that meets the density."""
    return run_prune_width(request)


@task(name="fine-tune-compressed", cache_policy=TASK_SOURCE + CacheKeyFnPolicy(
    cache_key_fn=_phase_key("fine-tune-compressed")), **CACHED)
def fine_tune_compressed(request: CompressRequest, pruned: Compressed) -> Compressed:
    """The sliced model's brief distillation fine-tune, and level 3 (block masks) if asked."""
    return run_fine_tune_compressed(request, pruned)
