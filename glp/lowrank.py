"""Low-rank factorisation of weight matrices: truncated SVD and Fisher-weighted SVD.

A rank-``r`` plan entry replaces one ``nn.Linear`` (``out x in``) by two thin ones,
``in -> r`` (no bias) then ``r -> out`` (the original bias): ``r * (in + out)`` weights
instead of ``in * out``, and as many fewer multiply-adds, so the model is smaller *and*
faster once ``r < in * out / (in + out)``. The word embeddings (``V x d``) become a
``V x r`` lookup followed by an ``r -> d`` projection (smaller, not faster: a lookup costs
nothing).

Two ways to choose the factors, both with no fine-tuning afterwards ("offline"):

- **SVD**: the best rank-``r`` approximation in Frobenius norm (Eckart-Young).
- **Fisher-weighted SVD** (Hsu et al., ICLR 2022): the task does not care about every
  weight equally. The empirical Fisher information of each weight (its squared gradient
  of the task loss, summed over the selection split) is summed per input dimension, and
  the factorisation minimises ``||(W - AB) diag(sqrt(I))||``: closed form, an SVD of
  ``W diag(sqrt(I))`` with the weighting undone on the input-side factor. For the word
  embeddings the weighting is per hidden dimension (the columns of ``E``).

Ratios: a module type compressed at ratio ``R`` stores ``1/R`` of its weights, so a
``n x m`` matrix gets ``r = floor(n * m / (R * (n + m)))`` (the reference code's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from glp import GlpError
from glp.plan import EMBEDDINGS, ROLES

FactorFn = Callable[[str, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""``(key, weight, rank) -> (second, first)``: ``weight ~ second @ first``."""


class LowRankLinear(nn.Module):
    """``second(first(x))``: an ``nn.Linear`` factorised at ``rank``.

    ``first`` may be a module shared with other layers (the linear autoencoder's decoder).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 first: nn.Linear | None = None, device=None, dtype=None):
        super().__init__()
        self.first = first if first is not None else nn.Linear(
            in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.second.in_features

    @property
    def bias(self):
        return self.second.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense product (for reading; the parameters are the factors)."""
        return self.second.weight @ self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class LowRankEmbedding(nn.Module):
    """An ``nn.Embedding`` factorised at ``rank``: a thin lookup, then a projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int,
                 padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        self.codes = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx,
                                  device=device, dtype=dtype)
        self.project = nn.Linear(rank, embedding_dim, bias=False, device=device, dtype=dtype)
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.codes.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.project.out_features

    @property
    def rank(self) -> int:
        return self.codes.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        return self.codes.weight @ self.project.weight.T

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.codes(ids))


def rank_for_ratio(shape: Iterable[int], ratio: float) -> int:
    """The rank at which two factors of a ``n x m`` matrix hold ``1/ratio`` of its weights.

    Raises:
        GlpError: the ratio leaves less than rank 1.
    """
    n, m = (int(s) for s in shape)
    rank = int(n * m / (ratio * (n + m)))
    if rank < 1:
        raise GlpError(f"--ratio {ratio:g}: a {n}x{m} matrix would keep rank "
                       f"{n * m / (ratio * (n + m)):.2f} < 1; the largest ratio it allows is "
                       f"{n * m / (n + m):.1f}")
    return rank


def svd_factors(weight: torch.Tensor, rank: int, column_weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(second, first)`` with ``second @ first`` the best rank-``rank`` approximation of
    ``weight``, in the norm weighted by ``column_weights`` per column (None: plain SVD)."""
    matrix = weight.detach().to(torch.float64)
    if column_weights is not None:
        scale = column_weights.detach().to(torch.float64)
        matrix = matrix * scale
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    second = u[:, :rank] * s[:rank]
    first = vh[:rank]
    if column_weights is not None:
        first = first / scale
    return second.to(weight.dtype), first.to(weight.dtype)


def fisher_column_weights(fisher: torch.Tensor) -> torch.Tensor:
    """Per-column weights ``sqrt(sum of Fisher over rows)``, floored so that no column's
    weight is zero (a dimension the split never exercised keeps a small say)."""
    importance = fisher.to(torch.float64).sum(0).sqrt()
    floor = importance.max() * 1e-3 if importance.max() > 0 else torch.tensor(1.0)
    return importance.clamp_min(floor)


def plain_factors(key: str, weight: torch.Tensor, rank: int):
    return svd_factors(weight, rank)


def fisher_factors(fisher: Mapping[str, torch.Tensor]) -> FactorFn:
    """A factor function that weights each matrix by its Fisher information (by key)."""

    def factor(key: str, weight: torch.Tensor, rank: int):
        if key not in fisher:
            raise GlpError(f"no Fisher information for '{key}'")
        return svd_factors(weight, rank, fisher_column_weights(fisher[key]))

    return factor


def factorise_linear(linear: nn.Module, rank: int, factors: tuple[torch.Tensor, torch.Tensor]
                     | None = None, first: nn.Linear | None = None) -> LowRankLinear:
    """A :class:`LowRankLinear` for ``linear``: with ``factors`` set from them, else (on the
    meta device, or when loading weights next) structure only."""
    weight = linear.weight
    module = LowRankLinear(linear.in_features, linear.out_features, rank,
                           bias=linear.bias is not None, first=first, device=weight.device,
                           dtype=weight.dtype)
    with torch.no_grad():
        if factors is not None:
            second, first_weight = factors
            module.second.weight.copy_(second)
            if first is None:
                module.first.weight.copy_(first_weight)
        if linear.bias is not None and weight.device.type != "meta":
            module.second.bias.copy_(linear.bias)
    return module


def factorise_embedding(embedding: nn.Embedding, rank: int,
                        factors: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> LowRankEmbedding:
    """A :class:`LowRankEmbedding` for ``embedding``; ``factors`` = ``(codes, projection)``
    with ``codes @ projection ~ embedding.weight``."""
    weight = embedding.weight
    module = LowRankEmbedding(embedding.num_embeddings, embedding.embedding_dim, rank,
                              padding_idx=embedding.padding_idx, device=weight.device,
                              dtype=weight.dtype)
    if factors is not None:
        with torch.no_grad():
            module.codes.weight.copy_(factors[0])
            module.project.weight.copy_(factors[1].T)
    return module


def word_embeddings(model: nn.Module) -> nn.Module:
    """The word-embedding module of a supported encoder (every family names it so)."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    module = getattr(embeddings, "word_embeddings", None)
    if module is None:
        raise GlpError(f"{type(model).__name__} has no embeddings.word_embeddings")
    return module


def apply_ranks(model: nn.Module, ranks: Mapping[str, int], shared: Iterable[str] = (),
                factor: FactorFn | None = None) -> None:
    """Replace every matrix named in ``ranks`` by its factors, in place.

    ``factor`` computes them from the dense weights (:func:`plain_factors` for SVD,
    :func:`fisher_factors`); None builds the structure only (the weights are loaded next,
    or the model is on the meta device). A ``shared`` role gets one input-side factor for
    all its layers; its values come from the weights loaded next (or a caller that trains
    them), never from ``factor``.
    """
    from glp.surgery import _set, encoder_layers, kept_layers, role_module

    shared = set(shared)
    position = {original: p for p, original in enumerate(kept_layers(model))}
    layers = encoder_layers(model)
    common: dict[str, nn.Linear] = {}
    for key, rank in ranks.items():
        if key == EMBEDDINGS:
            embedding = word_embeddings(model)
            if isinstance(embedding, LowRankEmbedding):
                raise GlpError("the word embeddings are already factorised")
            factors = None
            if factor is not None and embedding.weight.device.type != "meta":
                factors = factor(key, embedding.weight, rank)
            model.base_model.embeddings.word_embeddings = factorise_embedding(
                embedding, rank, factors)
            continue
        layer, _, role = key.partition(".")
        if int(layer) not in position:
            continue
        owner = layers[position[int(layer)]]
        linear = role_module(model, owner, role)
        if isinstance(linear, LowRankLinear):
            raise GlpError(f"'{key}' is already factorised")
        if role not in shared and rank > min(linear.in_features, linear.out_features):
            raise GlpError(f"rank {rank} of '{key}' exceeds its {linear.out_features}x"
                           f"{linear.in_features} matrix")
        first = None
        if role in shared:
            if factor is not None and linear.weight.device.type != "meta":
                raise GlpError(f"'{role}' has a shared factor, which no per-matrix "
                               "factorisation computes: load its weights (factor=None)")
            first = common.setdefault(role, nn.Linear(
                linear.in_features, rank, bias=False, device=linear.weight.device,
                dtype=linear.weight.dtype))
        factors = None
        if factor is not None and first is None and linear.weight.device.type != "meta":
            factors = factor(key, linear.weight, rank)
        _set(owner, _role_path(model, role), factorise_linear(linear, rank, factors, first))


def _role_path(model: nn.Module, role: str) -> str:
    from glp.surgery import _family

    family = _family(model)
    if role in ("query", "key", "value"):
        return f"{family.attention}.{family.projections[ROLES.index(role)]}"
    return {"output": family.output, "ffn_in": family.ffn_in, "ffn_out": family.ffn_out}[role]


def matrices(model: nn.Module, roles: Iterable[str]) -> dict[str, nn.Module]:
    """Every matrix of the given roles, by plan key (``"<layer>.<role>"`` with original
    layer indices, or ``"embeddings"``)."""
    from glp.surgery import encoder_layers, kept_layers, role_module

    out: dict[str, nn.Module] = {}
    roles = list(roles)
    for position, original in enumerate(kept_layers(model)):
        layer = encoder_layers(model)[position]
        for role in roles:
            if role != EMBEDDINGS:
                out[f"{original}.{role}"] = role_module(model, layer, role)
    if EMBEDDINGS in roles:
        out[EMBEDDINGS] = word_embeddings(model)
    return out


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
    from glp.train import _collate, _columns, _to, model_device

    wanted = matrices(model, {k.partition(".")[2] or k for k in keys})
    wanted = {k: v for k, v in wanted.items() if k in set(keys)}
    columns = _columns(dataset)
    count = len(columns["input_ids"]) if max_examples is None else min(
        max_examples, len(columns["input_ids"]))
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
            batch = _to(_collate(columns, list(range(start, min(start + batch_size, count))),
                                 pad_id), device)
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
