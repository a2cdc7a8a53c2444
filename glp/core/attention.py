"""Attention with a different number of query/key and value/output dimensions per head.

Intra-attention pruning (GRAIN) keeps, in each head, its own set of query/key dimensions
and of value/output dimensions. glp stores only the kept rows and columns (the matrices
are physically smaller) and runs the family's own attention code unchanged, on a padded
layout: each kept head gets ``width`` slots, the layer's largest kept head size. The
projections compute their compact outputs and scatter them into the slots (the empty slots
hold zeros, which add nothing to ``q·k`` and give zero context); the attention output
matrix gathers the real value slots back before its compact product. So the model computes
exactly what the masked model computed, the projections and the output matrix cost only
the kept dimensions, and the score and context products cost ``heads x width``.

The BERT-like families (BERT, RoBERTa, XLM-R, ELECTRA) get a faster layout with no scatter:
:class:`GroupedSelfAttention`. Their heads fall into at most :data:`MAX_GROUPS` groups, each
with its own query/key and value/output widths (the kept dimensions rounded up to a
multiple of :data:`BUCKET`), and each group runs its own attention. The projections' weights
are gathered into that order, with zero rows for the padding, inside ``forward``: the
checkpoint keeps the compact weights, and so does the fp32 graph (onnxruntime folds the
gathers when it loads it); the int8 export folds them into constants before quantising.
docs/benchmarks.md has the two layouts side by side.

Scores keep the base model's scale ``1/sqrt(head_size)`` (a masked dimension changes no
scale in the reference either): families that precompute ``scaling`` keep it; families
that scale by the padded size at run time get the query (and DeBERTa's position-query)
output multiplied by ``sqrt(width / head_size)`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional


def _adopt(module: nn.Linear, linear: nn.Linear) -> None:
    """Make ``module`` an ``nn.Linear`` holding ``linear``'s parameters (no initialisation:
    a projection of a layer that kept no query/key dimension has zero rows)."""
    nn.Module.__init__(module)
    module.in_features, module.out_features = linear.in_features, linear.out_features
    module.weight = linear.weight
    module.bias = linear.bias


class ScatterLinear(nn.Linear):
    """A compact projection whose outputs land in the slots of a padded head layout.

    The weight holds the kept rows only (its state-dict name is the original layer's), and
    the slot index is rebuilt from the plan, never stored.
    """

    def __init__(self, linear: nn.Linear, slots: Sequence[int], size: int, scale: float = 1.0):
        _adopt(self, linear)
        self.size, self.scale = size, float(scale)
        self.register_buffer("slots", torch.as_tensor(list(slots), dtype=torch.long,
                                                      device=linear.weight.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compact = functional.linear(x, self.weight, self.bias)
        if self.scale != 1.0:
            compact = compact * self.scale
        # A scatter into zeros: about 4x faster on a CPU than gathering from the compact
        # output with a zero column appended (measured at batch 32, 50 tokens).
        padded = compact.new_zeros((*compact.shape[:-1], self.size))
        return padded.index_copy(-1, self.slots, compact)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={self.size}, scale={self.scale:g}"


class GatherLinear(nn.Linear):
    """The attention output matrix of a padded layout: it reads the real value slots only."""

    def __init__(self, linear: nn.Linear, slots: Sequence[int]):
        _adopt(self, linear)
        self.register_buffer("slot_index", torch.as_tensor(list(slots), dtype=torch.long,
                                                           device=linear.weight.device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x.index_select(-1, self.slot_index), self.weight, self.bias)


def layout(qk: Sequence[int], vo: Sequence[int], heads: int, head_size: int) -> dict:
    """The padded layout of one layer's kept dimensions (flat base indices).

    Returns:
        ``heads`` (the kept heads: those with a value dimension), ``width`` (slots per
        head), and per kind (``qk``, ``vo``) the base rows kept, in slot order, and their
        slots.
    """
    def by_head(dims):
        out = {h: [] for h in range(heads)}
        for dim in sorted(dims):
            out[dim // head_size].append(dim)
        return out

    qk_heads, vo_heads = by_head(qk), by_head(vo)
    kept = [h for h in range(heads) if vo_heads[h]]
    width = max(max(len(qk_heads[h]), len(vo_heads[h])) for h in kept)
    result = {"heads": kept, "width": width}
    for name, groups in (("qk", qk_heads), ("vo", vo_heads)):
        rows = [d for h in kept for d in groups[h]]
        slots = [i * width + r for i, h in enumerate(kept) for r in range(len(groups[h]))]
        result[name] = (rows, slots)
    return result


BUCKET = 8
"""Grouped layout: a group's query/key and value/output widths are multiples of this."""

MAX_GROUPS = 2
"""Grouped layout: at most this many groups (attention calls) per layer. Fewer groups mean
fewer operations and more zero padding: on SST-2's GRAIN model at density 0.3 (MiniLM),
one group was the slowest at batch 32 and four the slowest at batch 1 (int8 ONNX and
PyTorch); two and three were within noise of each other."""


def _by_head(dims: Sequence[int], heads: int, head_size: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {h: [] for h in range(heads)}
    for dim in sorted(dims):
        out[dim // head_size].append(dim)
    return out


def grouped_layout(qk: Sequence[int], vo: Sequence[int], heads: int, head_size: int, *,
                   bucket: int | None = None, max_groups: int | None = None) -> dict:
    """The grouped layout of one layer's kept dimensions (flat base indices).

    The compact rows are :func:`layout`'s (kept heads in order, each head's dimensions
    sorted). Heads are grouped by their widths rounded up to ``bucket`` (default
    :data:`BUCKET`; at least 1
    query/key slot: a head with values but no query/key dimension scores every token 0 and
    attends uniformly), then the two groups whose merge adds the fewest padded rows merge
    until at most ``max_groups`` (default :data:`MAX_GROUPS`) remain.

    Returns:
        ``heads`` (the kept heads), ``groups`` (``(heads, qk width, vo width)`` per group, in
        order), and per kind (``qk``, ``vo``) ``(rows, index)``: ``rows`` the base rows kept,
        in compact order; ``index[i]`` the compact row at grouped position ``i``, or
        ``len(rows)`` (a zero row) for padding.
    """
    bucket = BUCKET if bucket is None else bucket
    max_groups = MAX_GROUPS if max_groups is None else max_groups
    qk_heads, vo_heads = _by_head(qk, heads, head_size), _by_head(vo, heads, head_size)
    kept = [h for h in range(heads) if vo_heads[h]]

    def rounded(count: int) -> int:
        return min(head_size, max(1, math.ceil(count / bucket) * bucket))

    clusters: dict[tuple[int, int], list[int]] = {}
    for h in kept:
        clusters.setdefault((rounded(len(qk_heads[h])), rounded(len(vo_heads[h]))), []
                            ).append(h)
    merged = sorted(clusters.items())

    def cost(width: tuple[int, int], members: list[int]) -> int:
        return len(members) * (width[0] + width[1])

    while len(merged) > max_groups:
        best = None
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                (wa, ha), (wb, hb) = merged[i], merged[j]
                width = (max(wa[0], wb[0]), max(wa[1], wb[1]))
                extra = cost(width, ha + hb) - cost(wa, ha) - cost(wb, hb)
                if best is None or extra < best[0]:
                    best = (extra, i, j, width)
        _, i, j, width = best
        union = sorted(merged[i][1] + merged[j][1])
        merged = sorted([m for n, m in enumerate(merged) if n not in (i, j)] + [(width, union)])
    result = {"heads": kept, "groups": [(len(m), w[0], w[1]) for w, m in merged]}
    for position, (name, groups) in enumerate((("qk", qk_heads), ("vo", vo_heads))):
        rows = [d for h in kept for d in groups[h]]
        start, offset = {}, 0
        for h in kept:
            start[h], offset = offset, offset + len(groups[h])
        index: list[int] = []
        for width, members in merged:
            for h in members:
                count = len(groups[h])
                index += list(range(start[h], start[h] + count))
                index += [len(rows)] * (width[position] - count)
        result[name] = (rows, index)
    return result


class _Gathered(nn.Linear):
    """A compact matrix used in a grouped layout's order: its rows (``dim`` 0) or columns
    (``dim`` 1) gathered, with a zero one for padding, before the product. Gathering the
    weights, not the outputs, keeps the checkpoint's compact matrix as the parameter (and as
    an exported graph's initializer) while no activation is ever scattered. Under
    inference (no autograd, eval mode) the gathered matrix is kept until the weight changes.
    """

    def __init__(self, linear: nn.Linear, index: Sequence[int], dim: int):
        _adopt(self, linear)
        self.dim = dim
        weight = linear.weight
        self.register_buffer("index", torch.as_tensor(list(index), dtype=torch.long,
                                                      device=weight.device), persistent=False)
        # Buffers, not computed zeros: an exporter folds constant inputs into constants.
        shape = (1, weight.shape[1]) if dim == 0 else (weight.shape[0], 1)
        self.register_buffer("zero", weight.new_zeros(shape), persistent=False)
        self.register_buffer("zero_bias", weight.new_zeros(1), persistent=False)
        self._cache: tuple | None = None

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias in the layout's order."""
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device)
        cached = not (self.training or torch.is_grad_enabled()
                      or torch.onnx.is_in_onnx_export())
        if cached and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        weight = torch.cat([self.weight, self.zero], self.dim).index_select(self.dim,
                                                                             self.index)
        bias = self.bias
        if bias is not None and self.dim == 0:
            bias = torch.cat([bias, self.zero_bias]).index_select(0, self.index)
        if cached:
            self._cache = (key, (weight, bias))
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, *self.gathered())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grouped={len(self.index)}"


class GroupedLinear(_Gathered):
    """A compact projection whose outputs come in a grouped layout's order (its rows
    gathered); the weight holds the kept rows only, under the original layer's name."""

    def __init__(self, linear: nn.Linear, index: Sequence[int]):
        super().__init__(linear, index, dim=0)


class GroupedOutput(_Gathered):
    """The attention output matrix of a grouped layout: its compact columns read the groups'
    contexts (a zero column for each padding slot)."""

    def __init__(self, linear: nn.Linear, index: Sequence[int]):
        super().__init__(linear, index, dim=1)


class GroupedSelfAttention(nn.Module):
    """A BERT-like self-attention module whose heads run in groups of their own widths.

    It takes the place of the family's own module (``attention.self``), with its call
    (``hidden_states``, then ``attention_mask`` as the encoder prepared it) and its return
    (the context, and None for the weights). Scores keep the base scale
    ``1/sqrt(head_size)``.
    """

    def __init__(self, attention: nn.Module, query: GroupedLinear, key: GroupedLinear,
                 value: GroupedLinear, groups: Sequence[tuple[int, int, int]], head_size: int):
        super().__init__()
        self.query, self.key, self.value = query, key, value
        self.groups = tuple(tuple(int(x) for x in g) for g in groups)
        self.scaling = float(head_size) ** -0.5
        self.dropout_p = float(getattr(getattr(attention, "dropout", None), "p", 0.0))
        self.num_attention_heads = sum(g[0] for g in self.groups)
        self.attention_head_size = max(max(g[1], g[2]) for g in self.groups)
        self.train(attention.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, **kwargs) -> tuple[torch.Tensor, None]:
        query, key, value = (self.query(hidden_states), self.key(hidden_states),
                             self.value(hidden_states))
        rows, tokens = hidden_states.shape[:2]

        def heads(t: torch.Tensor, start: int, count: int, width: int) -> torch.Tensor:
            # (rows, heads, tokens, width); explicit sizes keep an exported graph small
            return t[:, :, start:start + count * width].reshape(rows, tokens, count, width
                                                                ).transpose(1, 2)

        if attention_mask is not None and attention_mask.dtype == torch.bool and (
                torch.onnx.is_in_onnx_export() or any(g[1] != g[2] for g in self.groups)):
            # one additive mask for every group (the plain products add it)
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype,
                                         device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        contexts, start_qk, start_vo = [], 0, 0
        for count, qk, vo in self.groups:
            context = self._attend(heads(query, start_qk, count, qk),
                                   heads(key, start_qk, count, qk),
                                   heads(value, start_vo, count, vo), attention_mask)
            contexts.append(context.transpose(1, 2).reshape(rows, tokens, count * vo))
            start_qk, start_vo = start_qk + count * qk, start_vo + count * vo
        return (contexts[0] if len(contexts) == 1 else torch.cat(contexts, -1)), None

    def _attend(self, query, key, value, mask):
        dropout = self.dropout_p if self.training else 0.0
        if dropout or (query.shape[-1] == value.shape[-1]
                       and not torch.onnx.is_in_onnx_export()):
            return functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=self.scaling, dropout_p=dropout)
        # The plain products: PyTorch's fused kernel wants one width for queries and values
        # (its fallback for two costs more than these), and an exporter's fused attention
        # adds NaN guards that cost more than the products at these sizes.
        scores = torch.matmul(query * self.scaling, key.transpose(-1, -2))
        if mask is not None:
            scores = scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1), value)

    def extra_repr(self) -> str:
        return f"groups={self.groups} (heads, query/key width, value/output width)"

