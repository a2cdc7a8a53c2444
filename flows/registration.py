"""Registering a layer strategy's models: one version per pruned depth, as a transformers
pipeline and as its ONNX twin, by the rule of :mod:`tasks.registry`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from glp.methods import REFERENCE
from tasks.registry import Registration, register_all, registrations
from tasks.tracking import (
    register_model,
    register_onnx,
)

if TYPE_CHECKING:
    from flows.job import Job, SearchOutcome
    from flows.params import PruneParams


def register_depths(params: PruneParams, job: Job, final_rows: list[dict], name: str,
                    outcome: SearchOutcome, distilled: bool = False) -> dict[str, str]:
    """Register one model per pruned depth (aliases ``depth-N`` and ``best``), by the rule
    of :mod:`tasks.registry`: chosen by the selection split, never diverged. Each is
    registered twice: as a transformers pipeline in ``name``, and as ONNX in
    ``name-onnx`` (same versions' models, same aliases) for serving without glp or
    transformers. Returns the pipeline model's aliases."""
    data = job.data
    order = outcome.order or [layer for _, removed in outcome.plan[-1:] for layer in removed]

    def depth_of(row: dict) -> int | None:
        mine = bool(row.get("distilled")) == distilled  # the plain or the distilled models
        return None if row["strategy"] == REFERENCE or not mine else row["depth"]

    how = (f"fine-tuned on {data.task} with distillation from the unpruned model"
           if distilled else f"fine-tuned on {data.task}")

    def register(registration: Registration) -> str:
        chosen, depth = registration.chosen, registration.group
        return register_model(
            job.tracking_uri, chosen["run_id"], chosen["_path"], name, job.job_id, depth,
            tags={**job.common_tags, **registration.score_tags(), **job.version_tags(),
                  "glp.removed_layers": ",".join(map(str, chosen["removed"])),
                  "glp.depth": depth, "glp.order": ",".join(map(str, order))},
            description=(f"{params.model} with layers {chosen['removed']} removed "
                         f"({depth} layers left), {how}; dev "
                         f"{data.metric} {chosen['value']:.4f} (seed {chosen['seed']}, chosen "
                         "by the selection split)"),
        )

    def register_as_onnx(registration: Registration) -> str:
        chosen, depth = registration.chosen, registration.group
        return register_onnx(
            job.tracking_uri, chosen["run_id"], chosen["_path"], f"{name}-onnx", job.job_id,
            registration.alias,
            tags={**job.common_tags, **registration.score_tags(), **job.version_tags(),
                  "glp.removed_layers": ",".join(map(str, chosen["removed"])),
                  "glp.depth": str(depth), "glp.order": ",".join(map(str, order))},
            description=f"{params.model} with layers {chosen['removed']} removed, as ONNX "
                        "(text in)", text=job.text_spec)

    plan = registrations(final_rows, depth_of, lambda depth: f"depth-{depth}")
    aliases = register_all(job.tracking_uri, name, plan, register, final_rows, depth_of)
    # The ONNX twin: its own registered model, so that each alias names one flavour.
    register_all(job.tracking_uri, f"{name}-onnx", plan, register_as_onnx,
                 [dict(row) for row in final_rows], depth_of)
    return aliases
