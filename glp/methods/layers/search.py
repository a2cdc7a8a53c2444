"""Layer-selection strategies: which encoder layers to remove, in which order.

A strategy is a generator: it yields one record per decision (a candidate scored, a
layer selected) and never logs or writes anything itself. Scoring is injected: a
``score`` function receives a batch of removal sets and returns one result per set
(a float, or any object with a ``.score`` float), so the same algorithm runs with a
fake scorer in a unit test, sequentially on a laptop, or in parallel on a cluster.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from glp.core.errors import GlpError, ParamError


@dataclass(frozen=True)
class CandidateScored:
    """One candidate of one iteration: the layers it removes and its selection score."""

    iteration: int
    # the layer this candidate removes on top of the earlier choices (None: a whole subset)
    layer: int | None
    removed: tuple[int, ...]  # every layer the candidate removes, sorted
    score: float
    result: Any = None  # whatever the scorer returned (metrics, timings, cache key)
    budget: float = 1.0  # the share of the fine-tune budget it was trained for


@dataclass(frozen=True)
class LayerSelected:
    """The decision of one iteration: ``layer`` is removed next."""

    iteration: int
    layer: int
    order: tuple[int, ...]  # the removal order so far, this layer last
    score: float | None  # the winning candidate's score (None for rule-based strategies)


@dataclass(frozen=True)
class SubsetChosen:
    """A strategy that is not nested chose ``removed`` as its set of ``count`` layers."""

    count: int
    removed: tuple[int, ...]
    score: float | None


@dataclass(frozen=True)
class LayerScored:
    """A zero-shot score of one layer (or block start) of the model with ``removed`` gone."""

    iteration: int
    layer: int
    removed: tuple[int, ...]
    method: str  # block-influence, angular-<n>
    value: float  # lower = safer to remove
    kept: bool  # still a candidate after the score (pre-filters drop the others)


@dataclass(frozen=True)
class Budget:
    """How a candidate is fine-tuned: for a share of the epochs, and from where.

    ``FULL`` is the reference protocol: every candidate trains for the whole budget from
    the pre-trained weights. Successive halving trains for a share of it; a warm start
    begins from one fine-tuned unpruned model (shared by every candidate) and repairs it
    for a share of the budget.
    """

    fraction: float = 1.0
    warm: bool = False


FULL = Budget()

SEARCHES = ("full", "halving", "warm")
"""How greedy scores its candidates: the reference protocol and the two cheaper ones."""

DEFAULT_FRACTION = {"halving": 0.1, "warm": 0.25}
MIN_FRACTION = 0.01
"""The share of the fine-tune budget: halving's first rung, warm start's repair."""


Record = CandidateScored | LayerSelected | SubsetChosen | LayerScored
# score(removal_sets) for the full budget, score(removal_sets, budget) for any other
Scorer = Callable[..., Sequence[Any]]
# removed layers -> glp.methods.layers.zeroshot.LayerSimilarity
SimilarityFn = Callable[[tuple[int, ...]], Any]
Selector = Callable[[Sequence[tuple[int, float]]], int]


def score_of(result: Any) -> float:
    """The selection score of a scorer result (a float or an object with ``.score``)."""
    value = float(getattr(result, "score", result))
    return value


def loss_of(result: Any) -> float:
    """The selection loss of a scorer result (``.loss``; NaN when it has none)."""
    return float(getattr(result, "loss", math.nan))


TIE_DECIMALS = 3
"""Scores are compared rounded to this many decimals, as the reference code does."""


def _rank_key(item: tuple[int, float]) -> tuple[bool, float, int]:
    layer, score = item
    # A real score (even -inf) ranks above every NaN; among NaNs only the layer counts.
    is_real = not math.isnan(score)
    return (is_real, round(score, TIE_DECIMALS) if is_real else 0.0, layer)


def rank_by_score_then_loss(candidates: Sequence[tuple[int, float, float]]) -> list[int]:
    """(layer, score, loss) triples, the layers best first: by the score rounded as in
    :func:`select_layer`, then by the lower loss, then by the higher layer.

    Successive halving ranks its rungs so: a short fine-tune often leaves every candidate
    at the majority class, where all scores tie and the layer index alone would decide.
    """
    def key(item: tuple[int, float, float]) -> tuple:
        layer, score, loss = item
        real, rounded, _ = _rank_key((layer, score))
        return (real, rounded, -loss if not math.isnan(loss) else -math.inf, layer)

    return [layer for layer, _, _ in sorted(candidates, key=key, reverse=True)]


def select_layer(candidates: Sequence[tuple[int, float]]) -> int:
    """Pick the layer whose removal scored best.

    As in the reference implementation, scores are rounded to 3 decimals before they are
    compared, and ties go to the highest layer index: with a few hundred selection
    examples a difference in the 4th decimal is noise, and the reference's own choice is
    then reproduced. A NaN score (a diverged fine-tune) never wins over a real one.

    Args:
        candidates: (layer, score) pairs, higher score is better.
    """
    if not candidates:
        raise GlpError("no candidates to select from")
    return max(candidates, key=_rank_key)[0]


def validate_budget(num_layers: int, remove: int) -> None:
    """Raise a clear error unless 1 <= remove <= num_layers - 1."""
    if num_layers < 2:
        raise GlpError(f"the model has {num_layers} encoder layer(s); nothing can be removed")
    if not 1 <= remove <= num_layers - 1:
        raise ParamError("remove", remove, f"1..{num_layers - 1} (the model has {num_layers} "
                         f"encoder layers; it cannot remove {remove} layers)")


class Strategy:
    """The interface: ``search`` yields records and ends with a choice for every count.

    Nested strategies (greedy, top, bottom, random, block influence) yield one
    ``LayerSelected`` per iteration: their choices form one removal order. The others
    (exhaustive, angular) choose each subset size on its own and yield ``SubsetChosen``.
    ``plan_of`` turns either into the removed set per number of removed layers.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_similarity: ClassVar[bool] = False  # reads hidden states of the pre-trained model

    @property
    def variant(self) -> str:
        """What tells two configurations of the same strategy apart ("" if nothing)."""
        return ""

    @property
    def label(self) -> str:
        return f"{self.name}-{self.variant}" if self.variant else self.name

    @classmethod
    def create(cls, options: StrategyOptions) -> Strategy:
        return cls()

    def validate(self, num_layers: int, remove: int) -> None:
        """Raise GlpError if this strategy cannot remove ``remove`` of ``num_layers`` layers."""
        validate_budget(num_layers, remove)

    def search(
        self,
        num_layers: int,
        remove: int,
        score: Scorer,
        select: Selector = select_layer,
        similarity: SimilarityFn | None = None,
    ) -> Iterator[Record]:
        raise NotImplementedError


@dataclass(frozen=True)
class StrategyOptions:
    """Options some strategies take; each strategy reads only its own."""

    seed: int = 0  # random: which random order
    prefilter_keep: int = 0  # greedy: fine-tune only the m lowest-block-influence candidates
    search: str = "full"  # greedy: full, halving or warm (SEARCHES)
    search_fraction: float | None = None  # greedy: halving's first rung / warm's repair
    exhaustive_limit: int = 64  # exhaustive: refuse searches needing more fine-tunes


def _score_all(score: Scorer, removal_sets: list[tuple[int, ...]], budget: Budget = FULL
               ) -> list[Any]:
    results = list(score(removal_sets) if budget == FULL else score(removal_sets, budget))
    if len(results) != len(removal_sets):
        raise RuntimeError(f"scorer returned {len(results)} results for {len(removal_sets)}")
    return results


def _need_similarity(similarity: SimilarityFn | None, name: str) -> SimilarityFn:
    if similarity is None:
        raise GlpError(f"the {name} strategy needs a hidden-state similarity function")
    return similarity


def _lowest_first(scores: dict[int, float]) -> list[int]:
    """Layers by score, lowest first; ties go to the higher layer (as in greedy)."""
    return sorted(scores, key=lambda layer: (scores[layer], -layer))


class GreedyLayerPruning(Strategy):
    """Peer et al. 2022: each iteration removes the layer whose removal hurts least.

    Every candidate starts again from the pre-trained weights with all earlier choices
    plus one more layer removed; the best-scoring one is kept. The choices form one
    nested order, so one search gives a model for every depth.

    With ``prefilter_keep = m`` each iteration first scores the remaining layers by
    block influence on the pre-trained model (no fine-tune) and fine-tunes only the m
    layers that change their input least: fewer fine-tunes, perhaps a worse choice.

    Two cheaper ways to score the candidates (``search``), each perhaps a worse choice:

    - ``halving`` (successive halving): every candidate of an iteration is fine-tuned
      for ``fraction`` of the budget; the better half is fine-tuned again for twice as
      much, and so on, until one remains (two left, or a rung at the whole budget, are
      decided by that rung). Each rung is a complete, shorter fine-tune. Rungs rank by
      the score rounded to 3 decimals, then by the lower selection loss (a short
      fine-tune often leaves every candidate at the majority class), then the layer.
    - ``warm``: candidates start from one fine-tuned unpruned model, shared by every
      candidate of every iteration, with their layers removed, and are repaired by a
      fine-tune of ``fraction`` of the budget. This is not the reference protocol.
    """

    name = "greedy"
    description = "fine-tune every candidate, remove the layer that hurts least (Peer et al.)"

    def __init__(self, prefilter_keep: int = 0, search: str = "full",
                 fraction: float | None = None):
        if prefilter_keep < 0:
            raise GlpError(f"prefilter keep must be 0 (off) or positive, not {prefilter_keep}")
        if search not in SEARCHES:
            raise GlpError(f"unknown search '{search}'; choose one of: {', '.join(SEARCHES)}")
        if search == "full":
            if fraction is not None:
                raise GlpError(f"a budget fraction ({fraction}) is for --search halving or "
                               "warm; the full search trains every candidate for the whole "
                               "budget")
        else:
            fraction = DEFAULT_FRACTION[search] if fraction is None else fraction
            if not (MIN_FRACTION <= fraction <= 1):  # also refuses NaN
                raise GlpError(f"the {search} search's budget fraction must be in "
                               f"[{MIN_FRACTION}, 1], not {fraction}")
        self.prefilter_keep = prefilter_keep
        self.search_kind = search
        self.fraction = fraction

    @property
    def needs_similarity(self) -> bool:  # type: ignore[override]
        return self.prefilter_keep > 0

    @property
    def variant(self) -> str:
        parts = [f"prefilter-{self.prefilter_keep}"] if self.prefilter_keep else []
        if self.search_kind != "full":
            parts.append(f"{self.search_kind}-{self.fraction}")  # exact: it names the job
        return "-".join(parts)

    @classmethod
    def create(cls, options: StrategyOptions) -> Strategy:
        return cls(options.prefilter_keep, options.search, options.search_fraction)

    def rungs(self, candidates: int) -> list[tuple[int, float]]:
        """(candidates, budget fraction) of each scoring round of an iteration."""
        if self.search_kind != "halving":
            return [(candidates, self.fraction or 1.0)]
        rounds, fraction = [], self.fraction
        while True:
            rounds.append((candidates, fraction))
            if candidates <= 2 or fraction >= 1.0:
                return rounds
            candidates, fraction = math.ceil(candidates / 2), min(1.0, round(2 * fraction, 6))

    def cost(self, num_layers: int, remove: int) -> float:
        """Candidate fine-tunes of a search without a pre-filter, in whole-budget
        equivalents (a warm start's shared fine-tune included)."""
        total = sum(n * f for k in range(remove) for n, f in self.rungs(num_layers - k))
        return total + (1.0 if self.search_kind == "warm" else 0.0)

    def _candidates(self, num_layers, order, similarity, iteration) -> tuple[list[int], list]:
        layers = [layer for layer in range(num_layers) if layer not in order]
        if not self.prefilter_keep or self.prefilter_keep >= len(layers):
            return layers, []
        from glp.methods.layers.zeroshot import block_influence

        removed = tuple(sorted(order))
        influence = block_influence(_need_similarity(similarity, "pre-filtered greedy")(removed))
        scores = dict(zip(layers, influence, strict=True))
        kept = sorted(_lowest_first(scores)[: self.prefilter_keep])
        records = [LayerScored(iteration, layer, removed, "block-influence", value,
                               layer in kept) for layer, value in scores.items()]
        return kept, records

    def search(self, num_layers, remove, score, select=select_layer, similarity=None):
        self.validate(num_layers, remove)
        order: list[int] = []
        warm = self.search_kind == "warm"
        for iteration in range(remove):
            layers, prefiltered = self._candidates(num_layers, order, similarity, iteration)
            yield from prefiltered
            ranked: list[int] = []
            for count, fraction in self.rungs(len(layers)):
                # the better part of the previous rung goes on (the first rung: every layer)
                alive = sorted(ranked[:count]) if ranked else layers
                budget = Budget(fraction, warm) if (warm or fraction < 1.0) else FULL
                removal_sets = [tuple(sorted([*order, layer])) for layer in alive]
                results = _score_all(score, removal_sets, budget)
                scored, losses = [], []
                for layer, removed, result in zip(alive, removal_sets, results, strict=True):
                    value = score_of(result)
                    scored.append((layer, value))
                    losses.append((layer, value, loss_of(result)))
                    yield CandidateScored(iteration, layer, removed, value, result, fraction)
                ranked = rank_by_score_then_loss(losses)
            # Halving decides by its ranking (the loss breaks ties of short fine-tunes);
            # the full and warm searches by the reference rule.
            chosen = ranked[0] if self.search_kind == "halving" else select(scored)
            order.append(chosen)
            yield LayerSelected(iteration, chosen, tuple(order), dict(scored)[chosen])


class _FixedOrder(Strategy):
    """A rule-based nested order: no search cost."""


    def order(self, num_layers: int, remove: int) -> list[int]:
        raise NotImplementedError

    def search(self, num_layers, remove, score, select=select_layer, similarity=None):
        self.validate(num_layers, remove)
        order = self.order(num_layers, remove)
        for iteration in range(remove):
            yield LayerSelected(iteration, order[iteration], tuple(order[: iteration + 1]), None)


class TopLayerPruning(_FixedOrder):
    """Drop the last layers first (Sajjad et al., "Poor Man's BERT"); no search cost."""

    name = "top"
    description = "remove the top layers, last first (Sajjad et al.)"

    def order(self, num_layers, remove):
        return [num_layers - 1 - i for i in range(remove)]


class BottomLayerPruning(_FixedOrder):
    """Drop the first layers first: the baseline that shows where a model keeps its skill."""

    name = "bottom"
    description = "remove the bottom layers, first first"

    def order(self, num_layers, remove):
        return list(range(remove))


class RandomLayerPruning(_FixedOrder):
    """A random nested order from a seeded generator (run several seeds for a spread)."""

    name = "random"
    description = "remove random layers (seeded; compare runs several orders)"

    def __init__(self, seed: int = 0):
        self.seed = seed

    @property
    def variant(self) -> str:
        return f"seed-{self.seed}"

    @classmethod
    def create(cls, options: StrategyOptions) -> Strategy:
        return cls(options.seed)

    def order(self, num_layers, remove):
        return random.Random(self.seed).sample(range(num_layers), remove)


class ExhaustiveSearch(Strategy):
    """The optimum for every subset size 1..k: fine-tune all subsets of each size.

    Costs sum over j of C(L, j) fine-tunes, so it is refused above ``limit``; it tells
    how far greedy's nested choices are from the best possible ones.
    """

    name = "exhaustive"
    description = "fine-tune every subset of each size, keep the best (small k only)"

    def __init__(self, limit: int = StrategyOptions.exhaustive_limit):
        self.limit = limit

    @classmethod
    def create(cls, options: StrategyOptions) -> Strategy:
        return cls(options.exhaustive_limit)

    @staticmethod
    def cost(num_layers: int, remove: int) -> int:
        return sum(math.comb(num_layers, j) for j in range(1, remove + 1))

    def validate(self, num_layers, remove):
        validate_budget(num_layers, remove)
        needed = self.cost(num_layers, remove)
        if needed > self.limit:
            raise GlpError(
                f"exhaustive search for 1..{remove} of {num_layers} layers needs {needed:,} "
                f"fine-tunes, more than the limit of {self.limit:,}; remove fewer layers or "
                f"raise --exhaustive-limit to {needed}"
            )

    def search(self, num_layers, remove, score, select=select_layer, similarity=None):
        self.validate(num_layers, remove)
        for count in range(1, remove + 1):
            subsets = list(itertools.combinations(range(num_layers), count))
            results = _score_all(score, subsets)
            scored = []
            for index, (removed, result) in enumerate(zip(subsets, results, strict=True)):
                value = score_of(result)
                scored.append((index, value))
                yield CandidateScored(count - 1, None, removed, value, result)
            # Ties go to the last subset in lexicographic order (the highest layers).
            best = select(scored)
            yield SubsetChosen(count, subsets[best], dict(scored)[best])


class BlockInfluence(Strategy):
    """ShortGPT (Men et al. 2024): remove the layers that change their input least.

    Block influence of layer l = 1 − cosine(input of l, output of l), averaged over the
    task's tokens on the pre-trained model; one forward pass, no fine-tune.
    """

    name = "block-influence"
    description = "zero-shot: remove layers with the lowest block influence (ShortGPT)"
    needs_similarity = True

    def search(self, num_layers, remove, score, select=select_layer, similarity=None):
        self.validate(num_layers, remove)
        from glp.methods.layers.zeroshot import block_influence

        influence = block_influence(_need_similarity(similarity, self.name)(()))
        scores = dict(enumerate(influence))
        for layer, value in scores.items():
            yield LayerScored(0, layer, (), self.name, value, True)
        order = _lowest_first(scores)[:remove]
        for iteration in range(remove):
            yield LayerSelected(iteration, order[iteration], tuple(order[: iteration + 1]), None)


class AngularDistance(Strategy):
    """Gromov et al. 2024: remove the block of n consecutive layers whose input and output
    are closest in angular distance; each n is chosen on its own (not nested)."""

    name = "angular"
    description = "zero-shot: remove the n consecutive layers with the smallest angular distance"
    needs_similarity = True

    def search(self, num_layers, remove, score, select=select_layer, similarity=None):
        self.validate(num_layers, remove)
        from glp.methods.layers.zeroshot import angular_distances

        sim = _need_similarity(similarity, self.name)(())
        for count in range(1, remove + 1):
            distances = dict(enumerate(angular_distances(sim, count)))
            for start, value in distances.items():
                yield LayerScored(count - 1, start, (), f"angular-{count}", value, True)
            start = _lowest_first(distances)[0]
            yield SubsetChosen(count, tuple(range(start, start + count)), None)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (GreedyLayerPruning, TopLayerPruning, BottomLayerPruning, RandomLayerPruning,
                ExhaustiveSearch, BlockInfluence, AngularDistance)
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)
"""Layer strategies, in display order."""


def get_strategy(name: str, options: StrategyOptions | None = None) -> Strategy:
    """The strategy registered under ``name`` (case-insensitive), configured by ``options``."""
    key = name.strip().lower()
    if key not in STRATEGIES:
        raise GlpError(f"unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[key].create(options or StrategyOptions())


def removal_order(records: Sequence[Record]) -> tuple[int, ...]:
    """The final removal order of a finished search."""
    selections = [r for r in records if isinstance(r, LayerSelected)]
    return selections[-1].order if selections else ()


def depth_plan(order: Sequence[int], num_layers: int) -> list[tuple[int, tuple[int, ...]]]:
    """(depth, removed layers) for every depth the order gives, the unpruned model first."""
    return [(num_layers - j, tuple(sorted(order[:j]))) for j in range(len(order) + 1)]


def plan_of(records: Sequence[Record], num_layers: int) -> list[tuple[int, tuple[int, ...]]]:
    """(depth, removed layers) for every depth a finished search chose, unpruned first.

    Works for nested strategies (from the removal order) and for the ones that choose
    each subset size on its own (from their ``SubsetChosen`` records).
    """
    subsets = {r.count: r.removed for r in records if isinstance(r, SubsetChosen)}
    if not subsets:
        return depth_plan(removal_order(records), num_layers)
    return [(num_layers, ())] + [(num_layers - count, tuple(sorted(subsets[count])))
                                 for count in sorted(subsets)]
