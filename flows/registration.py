"""Registering models: one text-in version per budget (a depth, a density, a ratio) and
its int8 graph, by the rule of :mod:`tasks.registry`.

Every version is the same kind of thing, whatever the method: an MLflow pyfunc that takes
text and runs an ONNX graph on onnxruntime (:func:`tasks.tracking.register_onnx`). The
fp32 version carries the budget's alias (``depth-4``, ``density-30``, ``best``); its int8
graph is a version of the same registered model with ``-int8`` after the alias
(``depth-4-int8``, ``best-int8``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glp.methods import REFERENCE
from tasks.registry import INT8, Registration, register_all, registrations
from tasks.tracking import register_onnx

if TYPE_CHECKING:
    from flows.job import Job, SearchOutcome
    from flows.params import PruneParams


def register_version(job: Job, name: str, registration: Registration, int8: bool,
                     model_dir: str, tags: dict[str, str], description: str) -> str:
    """The fp32 or int8 text-in version of a registration's chosen model; returns its
    number. Its tags: the job's, the scores (:meth:`Registration.score_tags`), ``tags``."""
    chosen = registration.chosen
    return register_onnx(
        job.tracking_uri, chosen["run_id"], model_dir, name, job.job_id,
        registration.alias + (INT8 if int8 else ""),
        tags={**job.common_tags, **registration.score_tags(), **job.version_tags(), **tags},
        description=(f"{description}; int8 ONNX (dynamic quantisation), dev "
                     f"{job.data.metric} {chosen['int8_value']:.4f} in int8" if int8
                     else f"{description}; ONNX fp32") + ", text in",
        text=job.text_spec, int8_folder=chosen.get("int8_dir") if int8 else None)


def register_depths(params: PruneParams, job: Job, final_rows: list[dict], name: str,
                    outcome: SearchOutcome, distilled: bool = False) -> dict[str, str]:
    """Register one model per pruned depth (aliases ``depth-N`` and ``best``, and the
    int8 versions' ``depth-N-int8`` and ``best-int8``), by the rule of
    :mod:`tasks.registry`: chosen by the selection split, never diverged. Returns where
    the aliases point."""
    data = job.data
    order = outcome.order or [layer for _, removed in outcome.plan[-1:] for layer in removed]

    def depth_of(row: dict) -> int | None:
        mine = bool(row.get("distilled")) == distilled  # the plain or the distilled models
        return None if row["strategy"] == REFERENCE or not mine else row["depth"]

    how = (f"fine-tuned on {data.task} with distillation from the unpruned model"
           if distilled else f"fine-tuned on {data.task}")

    def register(registration: Registration, int8: bool) -> str:
        chosen, depth = registration.chosen, registration.group
        return register_version(
            job, name, registration, int8, chosen["_path"],
            tags={"glp.removed_layers": ",".join(map(str, chosen["removed"])),
                  "glp.depth": str(depth), "glp.order": ",".join(map(str, order))},
            description=(f"{params.model} with layers {chosen['removed']} removed "
                         f"({depth} layers left), {how}; dev "
                         f"{data.metric} {chosen['value']:.4f} (seed {chosen['seed']}, chosen "
                         "by the selection split)"))

    plan = registrations(final_rows, depth_of, lambda depth: f"depth-{depth}")
    return register_all(job.tracking_uri, name, plan, register, final_rows, depth_of)
