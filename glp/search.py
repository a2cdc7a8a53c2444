"""Layer-selection strategies: which encoder layers to remove, in which order.

A strategy is a generator: it yields one record per decision (a candidate scored, a
layer selected) and never logs or writes anything itself. Scoring is injected: a
``score`` function receives a batch of removal sets and returns one result per set
(a float, or any object with a ``.score`` float), so the same algorithm runs with a
fake scorer in a unit test, sequentially on a laptop, or in parallel on a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from glp import GlpError


@dataclass(frozen=True)
class CandidateScored:
    """One candidate of one iteration: the layers it removes and its selection score."""

    iteration: int
    layer: int  # the layer this candidate removes on top of the earlier choices
    removed: tuple[int, ...]  # every layer the candidate removes, sorted
    score: float
    result: Any = None  # whatever the scorer returned (metrics, timings, cache key)


@dataclass(frozen=True)
class LayerSelected:
    """The decision of one iteration: ``layer`` is removed next."""

    iteration: int
    layer: int
    order: tuple[int, ...]  # the removal order so far, this layer last
    score: float | None  # the winning candidate's score (None for rule-based strategies)


Record = CandidateScored | LayerSelected
Scorer = Callable[[Sequence[tuple[int, ...]]], Sequence[Any]]
Selector = Callable[[Sequence[tuple[int, float]]], int]


def score_of(result: Any) -> float:
    """The selection score of a scorer result (a float or an object with ``.score``)."""
    value = float(getattr(result, "score", result))
    return value


def select_layer(candidates: Sequence[tuple[int, float]]) -> int:
    """Pick the layer whose removal scored best.

    Ties go to the highest layer index, as in the reference implementation; a NaN
    score (a diverged fine-tune) never wins over a real one.

    Args:
        candidates: (layer, score) pairs, higher score is better.
    """
    if not candidates:
        raise GlpError("no candidates to select from")

    def key(item: tuple[int, float]) -> tuple[bool, float, int]:
        layer, score = item
        # A real score (even -inf) ranks above every NaN; among NaNs only the layer counts.
        is_real = not math.isnan(score)
        return (is_real, score if is_real else 0.0, layer)

    return max(candidates, key=key)[0]


def validate_budget(num_layers: int, remove: int) -> None:
    """Raise a clear error unless 1 <= remove <= num_layers - 1."""
    if num_layers < 2:
        raise GlpError(f"the model has {num_layers} encoder layer(s); nothing can be removed")
    if not 1 <= remove <= num_layers - 1:
        raise GlpError(
            f"cannot remove {remove} layers: the model has {num_layers} encoder layers; "
            f"choose 1..{num_layers - 1}"
        )


class Strategy:
    """The interface: ``search`` yields records and ends with ``remove`` selections."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_scores: ClassVar[bool] = True

    def search(
        self, num_layers: int, remove: int, score: Scorer, select: Selector = select_layer
    ) -> Iterator[Record]:
        raise NotImplementedError


class GreedyLayerPruning(Strategy):
    """Peer et al. 2022: each iteration removes the layer whose removal hurts least.

    Every candidate starts again from the pre-trained weights with all earlier choices
    plus one more layer removed; the best-scoring one is kept. The choices form one
    nested order, so one search gives a model for every depth.
    """

    name = "greedy"
    description = "fine-tune every candidate, remove the layer that hurts least (Peer et al.)"

    def search(self, num_layers, remove, score, select=select_layer):
        validate_budget(num_layers, remove)
        order: list[int] = []
        for iteration in range(remove):
            layers = [layer for layer in range(num_layers) if layer not in order]
            removal_sets = [tuple(sorted([*order, layer])) for layer in layers]
            results = list(score(removal_sets))
            if len(results) != len(removal_sets):
                raise RuntimeError(f"scorer returned {len(results)} results for {len(layers)}")
            scored = []
            for layer, removed, result in zip(layers, removal_sets, results, strict=True):
                value = score_of(result)
                scored.append((layer, value))
                yield CandidateScored(iteration, layer, removed, value, result)
            chosen = select(scored)
            order.append(chosen)
            yield LayerSelected(iteration, chosen, tuple(order), dict(scored)[chosen])


class TopLayerPruning(Strategy):
    """Drop the last layers first (Sajjad et al., "Poor Man's BERT"); no search cost."""

    name = "top"
    description = "remove the top layers, last first (Sajjad et al.)"
    needs_scores = False

    def search(self, num_layers, remove, score, select=select_layer):
        validate_budget(num_layers, remove)
        order: list[int] = []
        for iteration in range(remove):
            order.append(num_layers - 1 - iteration)
            yield LayerSelected(iteration, order[-1], tuple(order), None)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (GreedyLayerPruning, TopLayerPruning)
}


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name`` (case-insensitive)."""
    key = name.strip().lower()
    if key not in STRATEGIES:
        raise GlpError(f"unknown strategy '{name}'; choose one of: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[key]()


def removal_order(records: Sequence[Record]) -> tuple[int, ...]:
    """The final removal order of a finished search."""
    selections = [r for r in records if isinstance(r, LayerSelected)]
    return selections[-1].order if selections else ()


def depth_plan(order: Sequence[int], num_layers: int) -> list[tuple[int, tuple[int, ...]]]:
    """(depth, removed layers) for every depth the order gives, the unpruned model first."""
    return [(num_layers - j, tuple(sorted(order[:j]))) for j in range(len(order) + 1)]
