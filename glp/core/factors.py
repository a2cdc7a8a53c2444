"""Low-rank modules and the factorisation of a model's matrices to given ranks (what a
plan's ranks build)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from glp.core.anatomy import EMBEDDINGS, ROLES
from glp.core.errors import GlpError

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


def plain_factors(key: str, weight: torch.Tensor, rank: int):
    return svd_factors(weight, rank)


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
    from glp.core.anatomy import encoder_layers, kept_layers, role_module, set_module

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
        set_module(owner, role_path(model, role), factorise_linear(linear, rank, factors, first))


def role_path(model: nn.Module, role: str) -> str:
    from glp.core.anatomy import family_of

    family = family_of(model)
    if role in ("query", "key", "value"):
        return f"{family.attention}.{family.projections[ROLES.index(role)]}"
    return {"output": family.output, "ffn_in": family.ffn_in, "ffn_out": family.ffn_out}[role]


def matrices(model: nn.Module, roles: Iterable[str]) -> dict[str, nn.Module]:
    """Every matrix of the given roles, by plan key (``"<layer>.<role>"`` with original
    layer indices, or ``"embeddings"``)."""
    from glp.core.anatomy import encoder_layers, kept_layers, role_module

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



