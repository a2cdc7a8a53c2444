"""Zero-shot layer scores: how much each encoder layer changes its input, without fine-tuning.

Greedy layer pruning fine-tunes one candidate model per remaining layer and step, which is
the expensive part. The scores here need only forward passes of the model as it is, so
they serve as published baselines (ShortGPT's block influence, Gromov et al.'s angular
distance) and as a cheap pre-filter that ranks the layers worth trying first.

Both scores come from one pass that compares every pair of hidden states token by token:
:func:`hidden_state_similarity` returns the full (K+1)x(K+1) cosine and angular matrices
(index 0 is the embedding output, index i+1 the output of layer i), and
:func:`block_influence` and :func:`angular_distances` read their numbers off it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch

from glp.core.errors import GlpError
from glp.training.data import collate

# Tokens per chunk when forming the per-token (K+1)x(K+1) cosine matrices: bounds the
# working memory at (K+1)^2 * _TOKEN_CHUNK float64 values (25 MB for K=24) per step.
_TOKEN_CHUNK = 2048

Matrix = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class LayerSimilarity:
    """Mean token-wise similarity between every pair of hidden states of an encoder.

    Plain nested tuples (not tensors or arrays) so that the object is hashable, JSON- and
    pydantic-friendly and can be cached or logged as it is.

    Attributes:
        cosine: ``cosine[i][j]`` is the mean cosine similarity of a token's vectors in hidden
            states ``i`` and ``j``, over all non-padding tokens. Index 0 is the embedding
            output (the input of layer 0), index ``i + 1`` the output of layer ``i``.
        angular: the same for the angular distance ``arccos(cos) / pi`` (0 = same direction,
            1 = opposite), averaged per token (Gromov et al., "The Unreasonable
            Ineffectiveness of the Deeper Layers").
        tokens: how many tokens were averaged.
    """

    cosine: Matrix
    angular: Matrix
    tokens: int

    @property
    def num_layers(self) -> int:
        """K, the number of encoder layers the model had (the matrices are (K+1)x(K+1))."""
        return len(self.cosine) - 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists instead of tuples); :meth:`from_dict` inverts it."""
        return {
            "cosine": [list(row) for row in self.cosine],
            "angular": [list(row) for row in self.angular],
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSimilarity:
        """Rebuild from :meth:`to_dict`'s output (e.g. after a JSON round trip)."""
        return cls(
            cosine=_as_matrix(data["cosine"]),
            angular=_as_matrix(data["angular"]),
            tokens=int(data["tokens"]),
        )


def _as_matrix(rows: Any) -> Matrix:
    return tuple(tuple(float(v) for v in row) for row in rows)


def _first_rows(dataset: Any, max_examples: int | None) -> Any:
    # Only the rows used are read (sorting them by length reads a whole column).
    if max_examples is not None and len(dataset) > max_examples:
        return dataset.select(range(max_examples))
    return dataset


@torch.inference_mode()
def hidden_state_similarity(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    max_examples: int | None = 512,
) -> LayerSimilarity:
    """Mean cosine similarity and angular distance between all pairs of hidden states.

    Deterministic: the first ``max_examples`` rows are used, in a fixed (length-sorted)
    batch order, with dropout off. Padding tokens are excluded, so the result does not
    depend on ``batch_size`` beyond float rounding. Sums are kept in float64 in two
    (K+1)x(K+1) accumulators, so memory does not grow with the number of examples.

    Args:
        model: a transformers sequence-classification model (BERT-like; possibly pruned by
            :func:`glp.core.surgery.remove_layers`) that returns ``hidden_states`` when called
            with ``output_hidden_states=True``.
        dataset: a tokenised ``datasets.Dataset`` (``input_ids``, ``attention_mask``,
            optionally ``token_type_ids``; ``labels`` is ignored), as made by
            :func:`glp.training.data.tokenize`.
        batch_size: rows per forward pass.
        max_examples: use at most this many rows from the start; ``None`` uses all.

    Returns:
        The two matrices and the number of tokens averaged. The diagonal is exactly 1
        (cosine) and 0 (angular), and both matrices are exactly symmetric.

    Raises:
        GlpError: ``batch_size`` or ``max_examples`` below 1, an empty dataset, a dataset
            without ``attention_mask``, or a model that returns no hidden states.
    """
    if batch_size < 1:
        raise GlpError(f"batch_size must be at least 1, got {batch_size!r}")
    if max_examples is not None and max_examples < 1:
        raise GlpError(f"max_examples must be at least 1 or None, got {max_examples!r}")
    if len(dataset) == 0:
        raise GlpError("cannot measure hidden-state similarity on an empty dataset")
    rows = _first_rows(dataset, max_examples)
    if "attention_mask" not in rows.column_names:
        raise GlpError(
            "the dataset has no attention_mask column; tokenise it with glp.training.data.tokenize"
        )
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    device = next(model.parameters()).device
    # Length-sorted batches waste little on padding; the sums do not depend on the order.
    lengths = [len(ids) for ids in rows["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)

    was_training = model.training
    model.eval()
    try:
        cos_sum: torch.Tensor | None = None
        ang_sum: torch.Tensor | None = None
        tokens = 0
        for start in range(0, len(order), batch_size):
            batch = collate(rows, order[start : start + batch_size], pad_id, device=device)
            batch.pop("labels", None)
            hidden = model(**batch, output_hidden_states=True).hidden_states
            if hidden is None:
                raise GlpError(
                    f"{type(model).__name__} returned no hidden states with "
                    "output_hidden_states=True; zero-shot scores need them"
                )
            mask = batch["attention_mask"].bool()
            # (K+1, N, H): every real token's vector in every hidden state.
            states = torch.stack([h[mask] for h in hidden]).to(torch.float64)
            units = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            if cos_sum is None:
                size = units.shape[0]
                cos_sum = torch.zeros(size, size, dtype=torch.float64, device=units.device)
                ang_sum = torch.zeros_like(cos_sum)
            for lo in range(0, units.shape[1], _TOKEN_CHUNK):
                chunk = units[:, lo : lo + _TOKEN_CHUNK]
                cos = torch.einsum("ind,jnd->nij", chunk, chunk).clamp(-1.0, 1.0)
                cos_sum += cos.sum(dim=0)
                ang_sum += (torch.arccos(cos) / math.pi).sum(dim=0)
            tokens += int(units.shape[1])
    finally:
        model.train(was_training)
    if tokens == 0 or cos_sum is None or ang_sum is None:
        raise GlpError("the dataset's rows have no unmasked tokens (attention_mask is all 0)")
    return LayerSimilarity(
        cosine=_finish(cos_sum / tokens, diagonal=1.0),
        angular=_finish(ang_sum / tokens, diagonal=0.0),
        tokens=tokens,
    )


def _finish(mean: torch.Tensor, diagonal: float) -> Matrix:
    # The einsum is symmetric only up to rounding, and arccos amplifies the rounding of a
    # self-similarity of 1 - 1e-16 to ~1e-8; state both facts exactly instead.
    mean = (mean + mean.T) / 2
    mean.fill_diagonal_(diagonal)
    return _as_matrix(mean.cpu().tolist())


def block_influence(sim: LayerSimilarity) -> list[float]:
    """ShortGPT's block influence of every layer: 1 - cos(layer input, layer output).

    Men et al. 2024 ("ShortGPT"): a layer whose output points where its input did changes
    the representation little, so it is the safest to remove; low means removable.

    Args:
        sim: from :func:`hidden_state_similarity`.

    Returns:
        ``BI[i] = 1 - cosine[i][i+1]`` for each of the K layers, each in [0, 2].
    """
    return [1.0 - sim.cosine[i][i + 1] for i in range(sim.num_layers)]


def angular_distances(sim: LayerSimilarity, n: int) -> list[float]:
    """Angular distance across every block of ``n`` consecutive layers (Gromov et al.).

    The distance between the input of layer ``l`` and the output of layer ``l + n - 1`` is
    what removing the block ``l .. l+n-1`` would skip; the block with the smallest distance
    is the one to remove.

    Args:
        sim: from :func:`hidden_state_similarity`.
        n: the block length, 1..K.

    Returns:
        ``angular[l][l + n]`` for ``l`` in ``0 .. K - n`` (K - n + 1 values).

    Raises:
        GlpError: ``n`` is not an integer in 1..K.
    """
    k = sim.num_layers
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise GlpError(f"block length n must be an integer in 1..{k}, got {n!r}") from None
    if not 1 <= n <= k:
        raise GlpError(
            f"block length n={n} is out of range: the model has {k} encoder layers, "
            f"so n must be in 1..{k}"
        )
    return [sim.angular[layer][layer + n] for layer in range(k - n + 1)]
