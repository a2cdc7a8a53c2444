"""Choosing a model by budget: the best final model that is fast or small enough.

One search (or comparison) yields a model per depth, density or ratio; a user picks the one
that fits their own trade-off. The rows are a run home's ``finals`` (one per model and
seed). A *model* is one job's one plan: its seeds are pooled (mean ± std of the dev metric)
and its deployable member is the one the registry rule chooses (the best selection-split
score, never a diverged seed): the registered version when there is one, else that seed's
saved directory.

A model is deployed in a precision and a runtime (:func:`deployments`): fp32 in PyTorch,
fp32 in onnxruntime, and int8 in onnxruntime, each with its own measured latency and, for
int8, its own dev score (the int8 graph scored on the same rows). The pick is across
models and deployments alike.

The budget's limits must all hold. With a speed or size limit the deployment with the best
mean dev metric wins; with only a quality floor (``min_metric``) the fastest one that
reaches it wins (by latency, else by parameters). The quality floor is on the dev metric,
the number every report shows; nothing else here is chosen on dev.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from glp.core.errors import GlpError
from glp.methods import BUDGETS, REFERENCE, target_size
from glp.report.format import score

FP32, INT8 = "fp32", "int8"
"""The precisions a model is deployed in (int8: onnxruntime's dynamic quantisation)."""
PYTORCH, ONNXRUNTIME = "pytorch", "onnxruntime"
BATCHES = (1, 32)
"""The batch sizes deployed latencies are measured at (``glp compare --methods``)."""
_LATENCY = {(FP32, PYTORCH, 1): "latency_b1_ms", (FP32, PYTORCH, 32): "latency_ms",
            (FP32, ONNXRUNTIME, 1): "onnx_b1_ms", (FP32, ONNXRUNTIME, 32): "onnx_b32_ms",
            (INT8, ONNXRUNTIME, 1): "int8_b1_ms", (INT8, ONNXRUNTIME, 32): "int8_b32_ms"}
"""The finals column of each deployment's latency, by batch."""


@dataclass(frozen=True)
class Budget:
    """The limits a model must meet (None: no limit)."""

    max_latency_ms: float | None = None
    min_speedup: float | None = None
    min_metric: float | None = None
    max_parameters: int | None = None

    OPTIONS = {"max_latency_ms": "--max-latency-ms", "min_speedup": "--min-speedup",
               "min_metric": "--min-metric", "max_parameters": "--max-parameters"}

    def __post_init__(self) -> None:
        given = {k: v for k, v in self.limits().items()}
        if not given:
            raise GlpError("give a budget: " + ", ".join(f"{o} X" for o in self.OPTIONS.values()))
        for name, value in given.items():
            if not math.isfinite(value) or (name != "min_metric" and value <= 0):
                raise GlpError(f"{self.OPTIONS[name]} {value}: expected a finite number"
                               + (" above 0" if name != "min_metric" else ""))

    def limits(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.OPTIONS
                if getattr(self, name) is not None}

    @property
    def needs_latency(self) -> bool:
        return self.max_latency_ms is not None or self.min_speedup is not None

    def describe(self) -> str:
        return " ".join(f"{self.OPTIONS[k]} {v:g}" for k, v in self.limits().items())


@dataclass(frozen=True)
class Model:
    """One job's one plan, its seeds pooled."""

    job_id: str
    strategy: str
    variant: str
    method: str
    model: str
    task: str
    metric: str
    depth: int
    plan: dict
    mean: float
    std: float
    seeds: int
    parameters: int | None
    latency_ms: float | None
    latency_batch: int | None
    speedup: float | None  # against the same job's unpruned model, measured beside it
    chosen_seed: int
    model_dir: str | None
    registered_model: str | None = None
    model_version: str | None = None
    extra: dict = field(default_factory=dict)
    int8_mean: float | None = None  # the dev metric of the int8 graphs, over the seeds
    int8_std: float | None = None
    int8_version: str | None = None
    int8_dir: str | None = None  # the int8 text-in folder its int8 score was measured on
    precision: str = FP32  # a deployment's (:func:`deployments`); a pooled model: fp32 ...
    runtime: str = PYTORCH  # ... in PyTorch, as every flow measures ``latency_ms``

    @property
    def label(self) -> str:
        name = self.strategy if not self.variant else f"{self.strategy}-{self.variant}"
        if self.method not in ("layers", REFERENCE) and self.method != self.strategy:
            name = f"{self.method} {name}"
        target = target_size(self.extra)
        what = f"{target[0]} {target[1]:g}" if target else f"{self.depth} layers"
        return f"{name}, {what}"

    @property
    def deployment(self) -> str:
        """``int8 onnxruntime``, ``fp32 pytorch``."""
        return f"{self.precision} {self.runtime}"

    @property
    def uri(self) -> str | None:
        """Where to load it from: the registered version of its precision (the fp32
        version holds the PyTorch checkpoint beside its graph), else the saved directory
        (an int8 deployment's: its text-in folder, ``TextModel(DIR)``)."""
        version = self.int8_version if self.precision == INT8 else self.model_version
        if self.registered_model and version:
            return f"models:/{self.registered_model}/{version}"
        return self.int8_dir if self.precision == INT8 else self.model_dir

    def meets(self, budget: Budget) -> bool:
        return not self.violations(budget)

    def violations(self, budget: Budget) -> dict[str, float]:
        """How far each limit is missed, relative to the limit (0 < v; inf: unmeasured)."""
        missed = {}
        checks = {
            "max_latency_ms": (self.latency_ms, lambda v, lim: v / lim - 1),
            "min_speedup": (self.speedup, lambda v, lim: lim / v - 1),
            "max_parameters": (self.parameters, lambda v, lim: v / lim - 1),
            "min_metric": (self.mean, lambda v, lim: (lim - v) / max(abs(lim), 1e-9)),
        }
        for name, limit in budget.limits().items():
            value, miss = checks[name]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                missed[name] = math.inf
                continue
            amount = miss(value, limit)
            if amount > 1e-12:
                missed[name] = amount
        return missed


EXTRA = (*(f"target_{budget}" for budget in BUDGETS), "train_epochs", "train_steps",
         "encoder_density", "stored_bytes",
         "latency_b1_ms", "onnx_b1_ms", "onnx_b32_ms", "int8_b1_ms", "int8_b32_ms")
"""Columns of the chosen row a model carries along (where measured)."""


def models(rows: Iterable[dict]) -> list[Model]:
    """The rows of ``finals`` grouped into models (job, strategy, variant, plan); every
    seed diverged: left out. The unpruned reference is a model too (a speed-up of 1)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        # A layer strategy's depth is its plan; a width or offline method's seeds each find
        # their own plan for one budget, which the variant names (density-50, svd-ratio-4).
        layers = (row.get("method") or "layers") in ("layers", REFERENCE)
        key = (row["job_id"], row["strategy"], row.get("variant") or "",
               row["plan"] if layers else "")
        groups.setdefault(key, []).append(row)
    reference_latency = {}
    for (job_id, strategy, _, _), members in groups.items():
        if strategy == REFERENCE:
            latency = _first(members, "latency_ms")
            if latency is not None:
                reference_latency[job_id] = latency
    found = []
    for (job_id, strategy, variant, plan), members in groups.items():
        alive = [r for r in members if not r["diverged"] and _finite(r["value"])]
        if not alive:
            continue
        chosen = max(alive, key=lambda r: (_or(r.get("selection_value"), -math.inf),
                                           -r["seed"]))
        values = [r["value"] for r in alive]
        int8 = [r.get("int8_value") for r in alive]
        int8 = int8 if all(_finite(v) for v in int8) else []
        latency = _first([chosen, *members], "latency_ms")  # the deployable member's
        plan = chosen["plan"]
        reference = reference_latency.get(job_id)
        found.append(Model(
            job_id=job_id, strategy=strategy, variant=variant,
            method=chosen.get("method") or "layers", model=chosen["model"],
            task=chosen["task"], metric=chosen["metric"], depth=int(chosen["depth"]),
            plan=json.loads(plan) if plan else {}, mean=statistics.mean(values),
            std=statistics.stdev(values) if len(values) > 1 else 0.0, seeds=len(values),
            parameters=_int(chosen.get("parameters")), latency_ms=latency,
            latency_batch=_int(_first([chosen, *members], "latency_batch")),
            speedup=reference / latency if reference and latency else None,
            chosen_seed=int(chosen["seed"]), model_dir=chosen.get("model_dir"),
            registered_model=chosen.get("registered_model") or None,
            model_version=chosen.get("model_version") or None,
            extra={k: v for k in EXTRA  # a latency is the plan's: any seed's
                   if (v := _first([chosen, *members] if k.endswith("_ms") else [chosen], k))
                   is not None},
            int8_mean=statistics.mean(int8) if int8 else None,
            int8_std=(statistics.stdev(int8) if len(int8) > 1 else 0.0) if int8 else None,
            int8_version=chosen.get("int8_model_version") or None,
            int8_dir=chosen.get("int8_dir") or None,
        ))
    return found


def deployments(found: list[Model], batch: int = 32,
                precisions: Iterable[str] = (FP32, INT8)) -> list[Model]:
    """Every way each model is deployed: fp32 in PyTorch and in onnxruntime, and int8 in
    onnxruntime where its int8 graph was scored, each with its latency at ``batch`` (None
    where the run did not measure it: ``glp compare --methods`` times every runtime, prune
    and compress time PyTorch at batch 32). A deployment's dev metric is its precision's
    (the int8 graph's own score for int8), and its speed-up is against the unpruned model
    in the same precision, runtime and batch, timed beside it."""
    if batch not in BATCHES:
        raise GlpError(f"--batch {batch}: latencies are measured at batch "
                       f"{' and '.join(map(str, BATCHES))}")
    wanted = set(precisions)
    out = []
    for model in found:
        for (precision, runtime, size), column in _LATENCY.items():
            if size != batch or precision not in wanted:
                continue
            if precision == INT8 and model.int8_mean is None:
                continue
            latency = model.latency_ms if column == "latency_ms" else model.extra.get(column)
            out.append(dataclasses.replace(
                model, precision=precision, runtime=runtime,
                latency_ms=float(latency) if _finite(latency) else None,
                latency_batch=batch,
                mean=model.int8_mean if precision == INT8 else model.mean,
                std=model.int8_std if precision == INT8 else model.std, speedup=None))
    reference = {(m.job_id, m.deployment): m.latency_ms for m in out
                 if m.strategy == REFERENCE and m.latency_ms}
    return [dataclasses.replace(m, speedup=reference[m.job_id, m.deployment] / m.latency_ms)
            if m.latency_ms and (m.job_id, m.deployment) in reference else m for m in out]


def pick(candidates: list[Model], budget: Budget) -> tuple[Model | None, list[Model]]:
    """The best model that meets ``budget`` (None if none does) and every one that does,
    best first."""
    meeting = [m for m in candidates if m.meets(budget)]
    if budget.needs_latency or budget.max_parameters is not None:
        # the best metric; ties: the faster, then the smaller
        meeting.sort(key=lambda m: (-m.mean, _or(m.latency_ms, math.inf),
                                    _or(m.parameters, math.inf)))
    else:
        # only a quality floor: the fastest (else the smallest) that reaches it
        meeting.sort(key=lambda m: (_or(m.latency_ms, math.inf), _or(m.parameters, math.inf),
                                    -m.mean))
    return (meeting[0] if meeting else None), meeting


class NothingMeets(GlpError):
    """No model meets the budget: a result, not a mistake (the command exits 1, not 2)."""


FILTERS = (("--task", "task"), ("--model", "model"), ("--job", "job_id"))
"""The options that narrow a pick, and the column of ``finals`` each one matches."""


def choose(rows: list[dict], budget: Budget, where: str, *, task: str | None = None,
           model: str | None = None, job: str | None = None, batch: int = 32,
           precisions: Iterable[str] = (FP32, INT8)) -> tuple[Model, list[Model]]:
    """The deployment ``budget`` picks from a run home's final rows (a model in a
    precision and a runtime, :func:`deployments` at ``batch``), and every one that meets it
    (best first).

    ``task``, ``model`` and ``job`` keep only the rows of that task, base model or job
    (case-insensitive); what is left must hold one model/task pair. ``where`` names the run
    home in messages.

    Raises:
        NothingMeets: no model meets the budget (the message names the closest one).
        GlpError: a filter matches nothing, several model/task pairs are left, every model
            diverged, or a speed limit is asked of models with no measured latency.
    """
    for (option, column), value in zip(FILTERS, (task, model, job), strict=True):
        if value is None:
            continue
        known = sorted({str(r[column]) for r in rows})
        rows = [r for r in rows if str(r[column]).lower() == value.lower()]
        if not rows:
            raise GlpError(f"{option} {value}: no final models of it in {where}; found: "
                           f"{', '.join(known)}")
    subjects = sorted({(r["model"], r["task"]) for r in rows})
    if len(subjects) > 1:
        raise GlpError(f"{where} holds models of {len(subjects)} model/task pairs ("
                       + ", ".join(f"{m} on {t}" for m, t in subjects)
                       + "); choose one with --model and --task")
    pooled = models(rows)
    if not pooled:
        raise GlpError(f"every final model in {where} diverged; nothing can be picked")
    found = deployments(pooled, batch, precisions)
    if not found:
        raise GlpError(f"--precision int8: no final model in {where} was scored in int8; "
                       "rerun its command with this glp (the int8 scores are added, nothing "
                       "is trained again)")
    chosen, meeting = pick(found, budget)
    if budget.needs_latency and not any(m.latency_ms for m in found):
        raise GlpError(f"no final model in this home has a measured latency at batch {batch} "
                       "(glp compare --methods measures every runtime at batch 1 and 32; "
                       "prune and compress PyTorch at 32); use --max-parameters or "
                       "--min-metric")
    if chosen is None:
        near = closest(found, budget)
        where_near = f"; the closest: {describe(near)}" if near else ""
        raise NothingMeets(f"no model meets {budget.describe()} ({len(pooled)} models, "
                           f"{len(found)} deployments searched){where_near}")
    return chosen, meeting


def describe(model: Model) -> str:
    """A model in one line: its label, job, dev score, size, latency and chosen seed."""
    latency = (f", {model.latency_ms:.2f} ms at batch {model.latency_batch}"
               if model.latency_ms else "")
    speedup = f" ({model.speedup:.2f}x)" if model.speedup else ""
    params = f", {model.parameters:,} parameters" if model.parameters else ""
    return (f"{model.label} as {model.deployment} (job {model.job_id[:12]}): dev "
            f"{model.metric} "
            f"{score(model.mean, model.std, model.seeds, counted=True)}{params}{latency}"
            f"{speedup}; seed {model.chosen_seed}")


def closest(candidates: list[Model], budget: Budget) -> Model | None:
    """The model that misses the budget by least (the sum of its relative misses; a limit
    it has no measurement for counts as missed by infinitely much)."""
    scored = [(sum(m.violations(budget).values()), -m.mean, m) for m in candidates]
    scored = [s for s in scored if math.isfinite(s[0])]
    return min(scored, key=lambda s: (s[0], s[1]))[2] if scored else None


def _first(rows: list[dict], column: str):
    for row in rows:
        if _finite(row.get(column)):
            return row[column]
    return None


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> int | None:
    return int(value) if _finite(value) else None


def _or(value, default):
    return default if value is None else value


def plan_summary(plan: dict) -> str:
    """A plan in one short line: the layers removed, then per kept layer what width and
    rank cuts leave (counts, not indices; the model directory's glp_plan.json has those)."""
    parts = [f"layers removed: {', '.join(map(str, plan.get('removed') or [])) or 'none'}"]
    for key, what in (("heads", "heads"), ("neurons", "FFN neurons"), ("qk", "query/key dims"),
                      ("vo", "value/output dims")):
        cut = plan.get(key) or {}
        if cut:
            counts = ", ".join(f"{layer}: {len(kept)}" for layer, kept in
                               sorted(cut.items(), key=lambda item: int(item[0])))
            parts.append(f"{what} kept per layer {{{counts}}}")
    if plan.get("ranks"):
        ranks = sorted(set(plan["ranks"].values()))
        parts.append(f"{len(plan['ranks'])} matrices factorised (ranks "
                     f"{ranks[0]}–{ranks[-1]})" if len(ranks) > 1 else
                     f"{len(plan['ranks'])} matrices factorised (rank {ranks[0]})")
    if plan.get("coded"):
        parts.append(f"autoencoded: {', '.join(sorted(plan['coded']))}")
    if plan.get("blocks"):
        parts.append(f"{len(plan['blocks'])} matrices with pruned blocks")
    return "; ".join(parts)
