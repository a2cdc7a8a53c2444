"""Offline-compression tasks (low rank, autoencoder): cached on disk, retried.

``compress-offline`` takes a fine-tuned model and compresses its weights with no
fine-tuning: truncated SVD or Fisher-weighted SVD (Fisher information from the task loss
on the selection split), or the reference autoencoder (the epoch kept is the one whose
decoded weights score best on the selection split). It saves the model directory
(safetensors + ``glp_plan.json`` + tokenizer, and ``glp_codes.safetensors`` for a
non-linear autoencoder) under ``artifacts/compressed/<key>``. The key holds the input
model's key, the data, the settings, the seed, the device type and this module's code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from pydantic import BaseModel

from glp import GlpError
from glp.core.anatomy import kept_layers
from glp.core.hashing import stable_hash
from glp.core.plan import EMBEDDINGS, ROLES
from glp.core.provenance import code_fingerprint
from glp.methods.names import OFFLINE_METHODS
from glp.training.config import FineTuneConfig
from tasks import faults, progress
from tasks.compression import Compressed, _load
from tasks.data import DataRef
from tasks.home import RunHome
from tasks.training import (
    CACHED,
    Checkpoint,
    _current_flow_run,
    _tokenizer,
    save_atomically,
    tokenized,
)

CODE = "tasks.offline"
"""The module whose source closure keys every offline compression."""



@dataclass(frozen=True)
class OfflineConfig:
    """An offline method's settings (the autoencoder's are the reference's by default)."""

    ratio: float = 10.0
    modules: tuple[str, ...] = ROLES
    fisher: bool = False  # lowrank: Fisher-weighted SVD
    fisher_examples: int = 2048  # selection-split examples for the Fisher information
    decoder: str = "nonlinear"  # autoencoder
    epochs: int = 20
    batch_size: int = 16
    eval_every: int = 1
    extra: dict = field(default_factory=dict)


class OfflineRequest(BaseModel, frozen=True):
    """Everything that decides an offline compression's result."""

    model: Checkpoint  # the fine-tuned model to compress
    data: DataRef
    config: FineTuneConfig  # batch size and max length for the selection split
    method: str
    method_config: dict  # OfflineConfig fields
    seed: int
    home: RunHome
    device: str = "cpu"

    @property
    def settings(self) -> OfflineConfig:
        values = dict(self.method_config)
        values["modules"] = tuple(values.get("modules", ROLES))
        return OfflineConfig(**values)

    def key(self) -> str:
        # The selection split scores the autoencoder's epochs (by the task's metric) and
        # gives the Fisher information (in batches of the run's batch size).
        return stable_hash("compress-offline", code_fingerprint(CODE), self.model.key,
                           self.data.fingerprints["selection"], self.data.metric,
                           self.data.is_regression, self.method, self.config.max_length,
                           self.config.batch_size, self.method_config, self.seed,
                           self.device.partition(":")[0])


def _selection_scorer(request: OfflineRequest, dataset):
    from glp.training.metrics import selection_score
    from glp.training.train import evaluate

    def score(model) -> float:
        metrics = evaluate(model, dataset, is_regression=request.data.is_regression,
                           batch_size=max(request.config.batch_size, 64))
        return selection_score(metrics, request.data.metric)

    return score


def run_compress_offline(request: OfflineRequest) -> Compressed:
    faults.inject("fine-tune")
    progress.check_stop()
    started = time.perf_counter()
    settings = request.settings
    key = request.key()
    model = _load(request.model.path, "input model's")
    from glp.core.plan import plan_of_model
    from glp.training.train import resolve_device

    model.to(resolve_device(request.device))
    base = plan_of_model(model)
    from glp.core.factors import matrices

    broken = [k for k, m in matrices(model, settings.modules).items()
              if not m.weight.isfinite().all()]
    if broken:  # a diverged input: nothing to compress, and never registered
        raise GlpError(f"the input model has non-finite weights in {', '.join(broken[:4])}; "
                       "compress a model that trained without diverging")
    dataset, _ = tokenized(request.data, "selection", request.model.base_path,
                           request.config.max_length, request.home)
    label = f"  {request.method} ratio {settings.ratio:g}"
    phases = []
    diverged = False
    if request.method == "lowrank":
        from glp.core.surgery import apply_plan
        from glp.methods.lowrank import fisher_factors, fisher_information, ranks_for_ratio

        ranks = ranks_for_ratio(model, settings.modules, settings.ratio)
        factor = "svd"
        if settings.fisher:
            on_step, close = progress.step_callback(f"{label}: Fisher information")
            try:
                fisher = fisher_information(
                    model, dataset, list(ranks), batch_size=request.config.batch_size,
                    max_examples=settings.fisher_examples,
                    on_step=on_step)
            finally:
                close()
            factor = fisher_factors(fisher)
        plan = base.offline(ranks)
        apply_plan(model, plan, factor)
        phases.append({"phase": "fisher-svd" if settings.fisher else "svd", "steps": 0,
                       "seconds": round(time.perf_counter() - started, 3),
                       "final_loss": 0.0, "diverged": False})
    elif request.method == "autoencoder":
        plan, phases, diverged = _autoencoder(model, base, request, settings, dataset, label)
    else:
        raise GlpError(f"unknown offline method {request.method!r}; choose one of "
                       f"{', '.join(OFFLINE_METHODS)}")
    model.glp_plan = plan
    model.to("cpu")
    path = None
    if not diverged:
        path = request.home.artifacts / "compressed" / key
        save_atomically(model, _tokenizer(request.model.base_path), path)
    seconds = round(time.perf_counter() - started, 3)
    checkpoint = Checkpoint(
        key=key, path=str(path) if path else None, base_path=request.model.base_path,
        removed=tuple(base.removed), kept=tuple(kept_layers(model)), seed=request.seed,
        steps=sum(p["steps"] for p in phases), examples=request.data.sizes["selection"],
        seconds=seconds, final_loss=phases[-1]["final_loss"] if phases else 0.0,
        diverged=diverged, device=request.device, flow_run_id=_current_flow_run())
    return Compressed(checkpoint=checkpoint, plan=plan.to_json(), phases=phases,
                      threshold_shift=0.0, remaining_after_training=1.0)


def _autoencoder(model, base, request: OfflineRequest, settings: OfflineConfig, dataset,
                 label: str):
    from glp.core.checkpoint import CODES_ATTR
    from glp.methods.autoencoder import AutoencoderConfig, fold_linear, train_autoencoder

    config = AutoencoderConfig(ratio=settings.ratio, decoder=settings.decoder,
                               epochs=settings.epochs, batch_size=settings.batch_size,
                               eval_every=settings.eval_every, seed=request.seed)
    score = _selection_scorer(request, dataset)
    ranks, shared, coded, codes, phases = {}, [], {}, {}, []
    for role in settings.modules:
        on_step, close = progress.step_callback(f"{label}: {role} autoencoder")
        try:
            result = train_autoencoder(
                model, role, config, evaluate=lambda: score(model),
                on_epoch=lambda epoch, total, loss, value, step=on_step: step(epoch, total))
        except GlpError as exc:
            if "diverged" not in str(exc):
                raise
            phases.append({"phase": role, "steps": 0, "seconds": 0.0,
                           "final_loss": float("nan"), "diverged": True})
            return base, phases, True
        finally:
            close()
        phases.append({"phase": role, "steps": result.epochs, "seconds": round(result.seconds, 3),
                       "final_loss": result.losses[result.best_epoch - 1],
                       "diverged": False, "latent": result.latent,
                       "best_epoch": result.best_epoch, "stored": result.stored})
        if settings.decoder == "linear":
            ranks.update(fold_linear(model, result))
            if role != EMBEDDINGS:
                shared.append(role)
        else:
            coded[role] = {"latent": result.latent, "hidden": result.hidden}
            codes[role] = result
    setattr(model, CODES_ATTR, codes)
    return base.offline(ranks, shared, coded), phases, False


def _key(context, parameters) -> str:
    return parameters["request"].key()


@task(name="compress-offline", cache_policy=TASK_SOURCE + CacheKeyFnPolicy(
    cache_key_fn=_key), **CACHED)
def compress_offline(request: OfflineRequest) -> Compressed:
    """Offline compression of a fine-tuned model (low rank or autoencoder), no fine-tuning."""
    return run_compress_offline(request)
