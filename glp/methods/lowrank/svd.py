"""Truncated SVD and Fisher-weighted SVD of a model's matrices (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from glp.core.errors import GlpError, ParamError
from glp.core.factors import (
    FactorFn,
    LowRankEmbedding,
    LowRankLinear,
    apply_ranks,
    matrices,
    plain_factors,
    svd_factors,
)
from glp.methods import Context, Outcome
from glp.methods.lowrank import LowRankParams


def rank_for_ratio(shape: Iterable[int], ratio: float) -> int:
    """The rank at which two factors of a ``n x m`` matrix hold ``1/ratio`` of its weights.

    Raises:
        GlpError: the ratio leaves less than rank 1.
    """
    n, m = (int(s) for s in shape)
    rank = int(n * m / (ratio * (n + m)))
    if rank < 1:
        raise ParamError("ratio", f"{ratio:g}", (
            f"at most {n * m / (n + m):.1f} (a {n}x{m} matrix would keep rank "
            f"{n * m / (ratio * (n + m)):.2f} < 1)"))
    return rank


def fisher_column_weights(fisher: torch.Tensor) -> torch.Tensor:
    """Per-column weights ``sqrt(sum of Fisher over rows)``, floored so that no column's
    weight is zero (a dimension the split never exercised keeps a small say)."""
    importance = fisher.to(torch.float64).sum(0).sqrt()
    floor = importance.max() * 1e-3 if importance.max() > 0 else torch.tensor(1.0)
    return importance.clamp_min(floor)


def fisher_factors(fisher: Mapping[str, torch.Tensor]) -> FactorFn:
    """A factor function that weights each matrix by its Fisher information (by key)."""

    def factor(key: str, weight: torch.Tensor, rank: int):
        if key not in fisher:
            raise GlpError(f"no Fisher information for '{key}'")
        return svd_factors(weight, rank, fisher_column_weights(fisher[key]))

    return factor


def ranks_for_ratio(model: nn.Module, roles: Iterable[str], ratio: float) -> dict[str, int]:
    """Per matrix, the rank that stores ``1/ratio`` of it."""
    return {key: rank_for_ratio(module.weight.shape, ratio)
            for key, module in matrices(model, roles).items()}


def fisher_information(model: nn.Module, dataset, keys: Iterable[str], *,
                       batch_size: int = 32, max_examples: int | None = None,
                       on_step: Callable[[int, int], None] | None = None
                       ) -> dict[str, torch.Tensor]:
    """The empirical Fisher information of the named matrices: per weight, the squared
    gradient of the task loss, summed over batches of ``dataset`` (with its labels).

    The model's weights are not changed (gradients only; the model is left in eval mode).
    """
    from glp.training.data import collate
    from glp.training.train import model_device

    wanted = matrices(model, {k.partition(".")[2] or k for k in keys})
    wanted = {k: v for k, v in wanted.items() if k in set(keys)}
    count = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    device = model_device(model)
    fisher = {k: torch.zeros_like(m.weight, dtype=torch.float32) for k, m in wanted.items()}
    params = {k: m.weight for k, m in wanted.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()  # no dropout: the information of the model as it will be used
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        batches = range(0, count, batch_size)
        for step, start in enumerate(batches):
            batch = collate(dataset, range(start, min(start + batch_size, count)), pad_id,
                            device=device)
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, list(params.values()))
            for key, grad in zip(params, grads, strict=True):
                fisher[key] += grad.detach().float().pow(2)
            if on_step is not None:
                on_step(step + 1, len(batches))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return fisher


__all__ = ["LowRankEmbedding", "LowRankLinear", "apply_ranks", "fisher_factors",
           "fisher_information", "matrices", "plain_factors", "rank_for_ratio",
           "ranks_for_ratio", "svd_factors"]


def check(model: nn.Module, params: LowRankParams) -> None:
    """Refuse a model or a ratio this method cannot compress (on a meta-device copy)."""
    from glp.core.plan import check_factorisable, plan_of_model

    check_factorisable(plan_of_model(model), params.modules)
    ranks_for_ratio(model, params.modules, params.ratio)


def run(context: Context, params: LowRankParams) -> Outcome:
    """Truncated (or Fisher-weighted) SVD of ``context.model``'s matrices, in place."""
    import time

    from glp.core.plan import plan_of_model
    from glp.core.surgery import apply_plan

    started = time.perf_counter()
    model = context.model
    ranks = ranks_for_ratio(model, params.modules, params.ratio)
    factor = "svd"
    if params.fisher:
        on_step, close = context.progress(f"lowrank ratio {params.ratio:g}: Fisher information")
        try:
            fisher = fisher_information(model, context.selection, list(ranks),
                                        batch_size=context.config.batch_size,
                                        max_examples=params.fisher_examples, on_step=on_step)
        finally:
            close()
        factor = fisher_factors(fisher)
    plan = plan_of_model(model).offline(ranks)
    apply_plan(model, plan, factor)
    return Outcome(model, plan, [{"phase": "fisher-svd" if params.fisher else "svd",
                                  "steps": 0, "seconds": round(time.perf_counter() - started, 3),
                                  "final_loss": 0.0, "diverged": False}])
