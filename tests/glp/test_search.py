"""Layer-selection strategies driven by fake scorers: pure Python, no models."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest

from glp import GlpError
from glp.methods.layers.search import (
    STRATEGIES,
    Budget,
    CandidateScored,
    ExhaustiveSearch,
    GreedyLayerPruning,
    LayerScored,
    LayerSelected,
    StrategyOptions,
    SubsetChosen,
    depth_plan,
    get_strategy,
    plan_of,
    rank_by_score_then_loss,
    removal_order,
    score_of,
    select_layer,
    validate_budget,
)
from glp.methods.layers.zeroshot import LayerSimilarity

# The cost of removing each layer of a 6-layer model: the cheapest go first.
PENALTY = {0: 9.0, 1: 1.0, 2: 5.0, 3: 0.5, 4: 3.0, 5: 7.0}


class PenaltyScorer:
    """Scores a removal set by minus the sum of its layers' penalties; records every call."""

    def __init__(self, penalty: dict[int, float] = PENALTY) -> None:
        self.penalty = penalty
        self.calls: list[list[tuple[int, ...]]] = []

    def __call__(self, removal_sets):
        self.calls.append(list(removal_sets))
        return [-sum(self.penalty[layer] for layer in removed) for removed in removal_sets]


@dataclass(frozen=True)
class Result:
    score: float
    note: str = ""


def run(num_layers: int, remove: int, score, strategy: str = "greedy") -> list:
    return list(get_strategy(strategy).search(num_layers, remove, score))


def selections(records) -> list[LayerSelected]:
    return [r for r in records if isinstance(r, LayerSelected)]


def candidates(records, iteration: int) -> list[CandidateScored]:
    return [r for r in records if isinstance(r, CandidateScored) and r.iteration == iteration]


# --------------------------------------------------------------------------- greedy


def test_greedy_finds_the_order_of_a_known_score_table() -> None:
    records = run(6, 4, PenaltyScorer())
    assert removal_order(records) == (3, 1, 4, 2)
    assert [s.layer for s in selections(records)] == [3, 1, 4, 2]


def test_greedy_candidate_counts_per_iteration() -> None:
    scorer = PenaltyScorer()
    records = run(6, 2, scorer)
    assert [len(call) for call in scorer.calls] == [6, 5]
    assert sum(isinstance(r, CandidateScored) for r in records) == 11
    scorer = PenaltyScorer()
    run(6, 5, scorer)
    assert [len(call) for call in scorer.calls] == [6, 5, 4, 3, 2]


def test_greedy_candidates_are_nested_distinct_sorted_tuples() -> None:
    scorer = PenaltyScorer()
    records = run(6, 4, scorer)
    order = removal_order(records)
    for iteration, call in enumerate(scorer.calls):
        earlier = set(order[:iteration])
        assert len(set(call)) == len(call)
        for removed in call:
            assert isinstance(removed, tuple)
            assert list(removed) == sorted(removed)
            assert len(removed) == iteration + 1
            assert earlier <= set(removed)
        # Exactly one candidate per layer not yet removed.
        added = sorted(set(removed).difference(earlier).pop() for removed in call)
        assert added == sorted(set(range(6)) - earlier)
        # The records carry the same sets the scorer saw, in the same order.
        assert [c.removed for c in candidates(records, iteration)] == call


def test_greedy_record_order_and_scores() -> None:
    records = run(6, 2, PenaltyScorer())
    kinds = [type(r).__name__ for r in records]
    assert kinds == ["CandidateScored"] * 6 + ["LayerSelected"] + ["CandidateScored"] * 5 + [
        "LayerSelected"
    ]
    first, second = selections(records)
    assert first == LayerSelected(0, 3, (3,), -0.5)
    assert second == LayerSelected(1, 1, (3, 1), -1.5)
    cands = candidates(records, 0)
    assert [c.layer for c in cands] == [0, 1, 2, 3, 4, 5]
    assert [c.score for c in cands] == [-PENALTY[i] for i in range(6)]
    assert all(c.result == c.score for c in cands)
    assert [c.layer for c in candidates(records, 1)] == [0, 1, 2, 4, 5]
    assert candidates(records, 1)[0].removed == (0, 3)


def test_greedy_accepts_results_with_a_score_attribute() -> None:
    def scorer(removal_sets):
        return [Result(-sum(PENALTY[i] for i in s), note=str(s)) for s in removal_sets]

    records = run(6, 3, scorer)
    assert removal_order(records) == (3, 1, 4)
    for c in (r for r in records if isinstance(r, CandidateScored)):
        assert isinstance(c.result, Result)
        assert c.result.note == str(c.removed)
        assert c.score == c.result.score and type(c.score) is float
    assert [s.score for s in selections(records)] == [-0.5, -1.5, -4.5]


def test_greedy_scorer_may_return_any_iterable() -> None:
    def scorer(removal_sets):
        return (-sum(PENALTY[i] for i in s) for s in removal_sets)  # a generator

    assert removal_order(run(6, 2, scorer)) == (3, 1)


def test_greedy_ties_go_to_the_highest_layer() -> None:
    records = run(6, 3, lambda sets: [0.0] * len(sets))
    assert removal_order(records) == (5, 4, 3)


def test_greedy_nan_never_wins() -> None:
    def scorer(removal_sets):
        # Removing layer 5 (the tie-break favourite) diverges; everything else is equal.
        return [math.nan if 5 in s else 1.0 for s in removal_sets]

    records = run(6, 2, scorer)
    assert removal_order(records) == (4, 3)
    assert all(not math.isnan(s.score) for s in selections(records))


def test_greedy_scorer_returning_the_wrong_count_fails() -> None:
    with pytest.raises(RuntimeError, match="returned 1 results"):
        run(6, 1, lambda sets: [0.0])


def test_greedy_uses_an_injected_selector() -> None:
    # A selector that picks the lowest layer index every time.
    strategy = GreedyLayerPruning()
    records = list(strategy.search(5, 2, PenaltyScorer(), select=lambda c: min(c)[0]))
    assert removal_order(records) == (0, 1)


def test_greedy_validates_the_budget_before_scoring() -> None:
    scorer = PenaltyScorer()
    with pytest.raises(GlpError, match="choose 1..5"):
        run(6, 6, scorer)
    assert scorer.calls == []


# --------------------------------------------------------------------------- top


def test_top_layer_order_without_scoring() -> None:
    def scorer(_):
        raise AssertionError("top-layer pruning must not score")

    records = run(6, 3, scorer, "top")
    assert records == [
        LayerSelected(0, 5, (5,), None),
        LayerSelected(1, 4, (5, 4), None),
        LayerSelected(2, 3, (5, 4, 3), None),
    ]
    assert removal_order(records) == (5, 4, 3)


def test_top_validates_the_budget() -> None:
    with pytest.raises(GlpError, match="choose 1..3"):
        run(4, 0, None, "top")


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("name", ["greedy", "GREEDY", " Greedy ", "top", "Top", "bottom",
                                  "random", "exhaustive", "Block-Influence", "angular"])
def test_get_strategy_is_case_insensitive(name: str) -> None:
    strategy = get_strategy(name)
    assert strategy.name == name.strip().lower()
    assert isinstance(strategy, STRATEGIES[strategy.name])


def test_get_strategy_unknown_names_the_choices() -> None:
    with pytest.raises(GlpError) as info:
        get_strategy("middle")
    assert str(info.value) == (
        "unknown strategy 'middle'; choose one of: greedy, top, bottom, random, exhaustive, "
        "block-influence, angular"
    )


@pytest.mark.parametrize("remove", [0, -1, 6, 7])
def test_validate_budget_rejects_out_of_range(remove: int) -> None:
    with pytest.raises(GlpError) as info:
        validate_budget(6, remove)
    message = str(info.value)
    assert f"cannot remove {remove} layers" in message
    assert "6 encoder layers" in message
    assert "choose 1..5" in message


def test_validate_budget_accepts_the_range_and_rejects_tiny_models() -> None:
    for remove in range(1, 6):
        validate_budget(6, remove)
    with pytest.raises(GlpError, match="1 encoder layer"):
        validate_budget(1, 1)


def test_select_layer_picks_the_best() -> None:
    assert select_layer([(0, 0.1), (1, 0.9), (2, 0.5)]) == 1
    assert select_layer([(4, -2.0)]) == 4


def test_select_layer_ties_and_nan() -> None:
    assert select_layer([(0, 0.5), (3, 0.5), (1, 0.5)]) == 3
    assert select_layer([(0, 0.5), (5, math.nan)]) == 0
    assert select_layer([(0, -math.inf), (5, math.nan)]) == 0
    assert select_layer([(2, math.nan), (1, math.nan)]) == 2  # all diverged: still a choice


def test_select_layer_needs_candidates() -> None:
    with pytest.raises(GlpError, match="no candidates"):
        select_layer([])


def test_score_of() -> None:
    assert score_of(0.25) == 0.25
    assert score_of(Result(0.75)) == 0.75
    assert type(score_of(1)) is float


def test_depth_plan() -> None:
    assert depth_plan((3, 1, 4), 6) == [
        (6, ()),
        (5, (3,)),
        (4, (1, 3)),
        (3, (1, 3, 4)),
    ]
    assert depth_plan((), 6) == [(6, ())]


def test_removal_order_of_no_records() -> None:
    assert removal_order([]) == ()


# --------------------------------------------------------------------------- other baselines


def _no_scores(_):
    raise AssertionError("this strategy must not fine-tune candidates")


def test_bottom_layer_order_without_scoring() -> None:
    records = run(6, 3, _no_scores, "bottom")
    assert removal_order(records) == (0, 1, 2)
    assert plan_of(records, 6) == [(6, ()), (5, (0,)), (4, (0, 1)), (3, (0, 1, 2))]


def test_random_orders_are_seeded_distinct_and_nested() -> None:
    def order(seed: int) -> tuple[int, ...]:
        strategy = get_strategy("random", StrategyOptions(seed=seed))
        return removal_order(list(strategy.search(6, 3, _no_scores)))

    assert order(0) == order(0)  # reproducible
    orders = {order(seed) for seed in range(5)}
    assert len(orders) > 1  # different seeds, different orders
    for found in orders:
        assert len(set(found)) == 3 and set(found) <= set(range(6))
    assert get_strategy("random", StrategyOptions(seed=3)).variant == "seed-3"
    assert get_strategy("random", StrategyOptions(seed=3)).label == "random-seed-3"


def test_exhaustive_finds_the_best_subset_of_every_size() -> None:
    # Interactions greedy cannot see: layers 0 and 5 are bad alone but fine together.
    def scorer(sets):
        return [10.0 if s == (0, 5) else -sum(PENALTY[i] for i in s) for s in sets]

    records = run(6, 2, scorer, "exhaustive")
    chosen = [r for r in records if isinstance(r, SubsetChosen)]
    assert [(c.count, c.removed, c.score) for c in chosen] == [(1, (3,), -0.5), (2, (0, 5), 10.0)]
    cands = [r for r in records if isinstance(r, CandidateScored)]
    assert len(cands) == 6 + 15  # every subset of size 1 and 2, once
    assert len({c.removed for c in cands}) == 21
    assert all(c.layer is None for c in cands)
    assert plan_of(records, 6) == [(6, ()), (5, (3,)), (4, (0, 5))]
    # Greedy, nested, misses the pair: it keeps its first choice (layer 3).
    assert removal_order(run(6, 2, scorer)) == (3, 1)


def test_exhaustive_ties_go_to_the_highest_subset() -> None:
    records = run(5, 2, lambda sets: [0.0] * len(sets), "exhaustive")
    chosen = [r.removed for r in records if isinstance(r, SubsetChosen)]
    assert chosen == [(4,), (3, 4)]


def test_exhaustive_refuses_politely_and_says_how_many() -> None:
    scorer = PenaltyScorer()
    strategy = get_strategy("exhaustive", StrategyOptions(exhaustive_limit=40))
    with pytest.raises(GlpError) as info:
        list(strategy.search(12, 3, scorer))
    # 12 + 66 + 220 subsets of size 1, 2 and 3.
    assert "needs 298 fine-tunes" in str(info.value)
    assert "--exhaustive-limit" in str(info.value)
    assert scorer.calls == []
    assert ExhaustiveSearch.cost(6, 2) == 21


def _similarity(cosine_steps: list[float]) -> LayerSimilarity:
    """Hidden states whose neighbouring cosines are ``cosine_steps`` (K layers, K+1 states).

    Cosines between states further apart multiply, angles add: a consistent geometry.
    """
    angles = [math.acos(c) for c in cosine_steps]
    positions = [0.0]
    for angle in angles:
        positions.append(positions[-1] + angle)
    size = len(positions)
    cosine = tuple(tuple(math.cos(abs(positions[i] - positions[j])) for j in range(size))
                   for i in range(size))
    angular = tuple(tuple(abs(positions[i] - positions[j]) / math.pi for j in range(size))
                    for i in range(size))
    return LayerSimilarity(cosine=cosine, angular=angular, tokens=100)


class SimilarityOf:
    """A fake hidden-state similarity of the model with some layers removed; records calls."""

    def __init__(self, steps: dict[int, float]):
        self.steps = steps  # original layer -> cosine between its input and output
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, removed):
        self.calls.append(removed)
        return _similarity([c for layer, c in self.steps.items() if layer not in removed])


STEPS = {0: 0.70, 1: 0.95, 2: 0.90, 3: 0.99, 4: 0.80, 5: 0.60}  # layer 3 changes least


def test_block_influence_removes_the_layers_that_change_least() -> None:
    similarity = SimilarityOf(STEPS)
    strategy = get_strategy("block-influence")
    records = list(strategy.search(6, 3, _no_scores, similarity=similarity))
    assert removal_order(records) == (3, 1, 2)
    assert similarity.calls == [()]  # one pass over the pre-trained model
    scores = {r.layer: r.value for r in records if isinstance(r, LayerScored)}
    assert scores[3] == pytest.approx(0.01) and scores[5] == pytest.approx(0.40)


def test_angular_chooses_the_closest_block_for_each_size() -> None:
    similarity = SimilarityOf(STEPS)
    records = list(get_strategy("angular").search(6, 3, _no_scores, similarity=similarity))
    chosen = {r.count: r.removed for r in records if isinstance(r, SubsetChosen)}
    # 1 layer: the smallest angle (layer 3); 2 layers: 2+3 (0.90, 0.99) beat 1+2 and 3+4;
    # 3 layers: 1..3 (0.95, 0.90, 0.99) has the smallest summed angle.
    assert chosen == {1: (3,), 2: (2, 3), 3: (1, 2, 3)}
    assert plan_of(records, 6)[1:] == [(5, (3,)), (4, (2, 3)), (3, (1, 2, 3))]
    assert removal_order(records) == ()


def test_zero_shot_strategies_need_a_similarity_function() -> None:
    for name in ("block-influence", "angular"):
        with pytest.raises(GlpError, match="similarity"):
            list(get_strategy(name).search(6, 1, _no_scores))


def test_greedy_prefilter_fine_tunes_only_the_m_lowest_influence_layers() -> None:
    scorer, similarity = PenaltyScorer(), SimilarityOf(STEPS)
    strategy = get_strategy("greedy", StrategyOptions(prefilter_keep=2))
    assert strategy.variant == "prefilter-2" and strategy.needs_similarity
    records = list(strategy.search(6, 2, scorer, similarity=similarity))
    # Iteration 1: block influence keeps layers 3 (0.01) and 1 (0.05); penalties pick 3.
    # Iteration 2 runs on the model without layer 3: keeps 1 and 2; penalties pick 1.
    assert scorer.calls == [[(1,), (3,)], [(1, 3), (2, 3)]]
    assert similarity.calls == [(), (3,)]
    assert removal_order(records) == (3, 1)
    first = [r for r in records if isinstance(r, LayerScored) and r.iteration == 0]
    assert sorted(r.layer for r in first if r.kept) == [1, 3]
    assert len(first) == 6
    # Without the pre-filter greedy tries all 6 + 5 candidates.
    full = PenaltyScorer()
    list(get_strategy("greedy").search(6, 2, full))
    assert [len(c) for c in full.calls] == [6, 5]


def test_greedy_prefilter_larger_than_the_candidates_is_plain_greedy() -> None:
    scorer = PenaltyScorer()
    strategy = get_strategy("greedy", StrategyOptions(prefilter_keep=10))
    records = list(strategy.search(6, 2, scorer, similarity=SimilarityOf(STEPS)))
    assert [len(c) for c in scorer.calls] == [6, 5]
    assert not any(isinstance(r, LayerScored) for r in records)


def test_plan_of_nested_strategies_matches_depth_plan() -> None:
    records = run(6, 3, PenaltyScorer())
    assert plan_of(records, 6) == depth_plan(removal_order(records), 6)


def test_scores_are_compared_at_3_decimals_as_the_reference_does() -> None:
    # 0.8504 and 0.8501 both round to 0.850: a tie, which the highest layer wins.
    assert select_layer([(2, 0.8504), (4, 0.8501)]) == 4
    assert select_layer([(2, 0.852), (4, 0.851)]) == 2  # a real difference still decides
    assert select_layer([(2, float("nan")), (1, -1.0)]) == 1


# ---------------------------------------------------------------- cheaper searches


class BudgetScorer:
    """A fake scorer that sees the budget: ``quality[fraction][layer]`` is how good a
    candidate removing ``layer`` (on top of the earlier choices) looks at that share of
    the budget. Records every call as (budget, removal sets)."""

    def __init__(self, quality: dict[float, dict[int, float]], base: dict[int, float]):
        self.quality, self.base = quality, base
        self.calls: list[tuple[Budget | None, list[tuple[int, ...]]]] = []

    def __call__(self, removal_sets, budget: Budget | None = None):
        self.calls.append((budget, list(removal_sets)))
        table = self.quality.get(budget.fraction if budget else 1.0, self.base)
        return [-sum(table[layer] for layer in removed) for removed in removal_sets]


def greedy(search: str, fraction: float | None = None, keep: int = 0) -> GreedyLayerPruning:
    return get_strategy("greedy", StrategyOptions(prefilter_keep=keep, search=search,
                                                  search_fraction=fraction))


@pytest.mark.parametrize(("candidates", "fraction", "expected"), [
    (6, 0.1, [(6, 0.1), (3, 0.2), (2, 0.4)]),
    (5, 0.1, [(5, 0.1), (3, 0.2), (2, 0.4)]),
    (4, 0.1, [(4, 0.1), (2, 0.2)]),
    (3, 0.1, [(3, 0.1), (2, 0.2)]),
    (2, 0.1, [(2, 0.1)]),
    (1, 0.1, [(1, 0.1)]),
    (12, 0.25, [(12, 0.25), (6, 0.5), (3, 1.0)]),  # the budget caps the last rung
    (12, 1.0, [(12, 1.0)]),
])
def test_halving_rungs_halve_the_candidates_and_double_the_budget(candidates, fraction,
                                                                   expected) -> None:
    assert greedy("halving", fraction).rungs(candidates) == expected


def test_halving_keeps_the_better_half_and_scores_each_rung_at_its_budget() -> None:
    # At every budget the ranking is PENALTY's: halving must find greedy's order.
    scorer = BudgetScorer({}, PENALTY)
    records = list(greedy("halving").search(6, 2, scorer))
    assert removal_order(records) == (3, 1)
    first = [(budget.fraction, sorted(s[0] for s in sets)) for budget, sets in scorer.calls[:3]]
    # 6 candidates at 0.1; the best 3 (penalties 0.5, 1, 3) at 0.2; the best 2 at 0.4
    assert first == [(0.1, [0, 1, 2, 3, 4, 5]), (0.2, [1, 3, 4]), (0.4, [1, 3])]
    assert all(not budget.warm for budget, _ in scorer.calls)
    rungs = [(r.layer, r.budget) for r in candidates(records, 0)]
    assert rungs[-2:] == [(1, 0.4), (3, 0.4)]
    # The record of the choice carries the score of its last rung.
    assert selections(records)[0].score == -0.5
    cost = sum(r.budget for r in records if isinstance(r, CandidateScored))
    assert cost == pytest.approx(greedy("halving").cost(6, 2)) == pytest.approx(3.9)
    assert cost / GreedyLayerPruning().cost(6, 2) < 0.4


def test_halving_decides_by_the_last_rung_even_against_earlier_scores() -> None:
    # Layer 4 looks best at 0.1 and 0.2 of the budget, layer 3 is best at 0.4: the last
    # rung decides. Layer 1, best at the whole budget, is dropped at the first rung.
    early = {0: 9.0, 1: 8.0, 2: 5.0, 3: 2.0, 4: 0.1, 5: 7.0}
    late = {0: 9.0, 1: 8.0, 2: 5.0, 3: 0.1, 4: 2.0, 5: 7.0}
    full = {0: 9.0, 1: 0.01, 2: 5.0, 3: 0.5, 4: 3.0, 5: 7.0}
    scorer = BudgetScorer({0.1: early, 0.2: early, 0.4: late}, full)
    records = list(greedy("halving").search(6, 1, scorer))
    assert removal_order(records) == (3,)
    assert 1 not in [r.layer for r in candidates(records, 0) if r.budget > 0.1]
    # the full search would have picked layer 1
    assert removal_order(run(6, 1, BudgetScorer({}, full))) == (1,)


def test_halving_never_carries_a_diverged_candidate_over_a_real_one() -> None:
    nan = float("nan")

    def scorer(removal_sets, budget=None):
        return [nan if removed == (2,) else -float(removed[0]) for removed in removal_sets]

    records = list(greedy("halving").search(4, 1, scorer))
    assert 2 not in [r.layer for r in candidates(records, 0) if r.budget > 0.1]
    assert removal_order(records) == (0,)


def test_warm_scores_every_candidate_once_from_the_warm_start() -> None:
    scorer = BudgetScorer({}, PENALTY)
    records = list(greedy("warm").search(6, 3, scorer))
    assert removal_order(records) == (3, 1, 4)
    assert [budget for budget, _ in scorer.calls] == [Budget(0.25, warm=True)] * 3
    assert [len(sets) for _, sets in scorer.calls] == [6, 5, 4]
    # 15 repairs of a quarter of the budget plus the shared fine-tune
    assert greedy("warm").cost(6, 3) == pytest.approx(1 + 15 * 0.25)


def test_full_search_calls_the_scorer_with_the_removal_sets_only() -> None:
    def scorer(removal_sets):  # the one-argument scorers of before keep working
        return [-float(sum(removed)) for removed in removal_sets]

    assert removal_order(list(greedy("full").search(4, 2, scorer))) == (0, 1)
    assert greedy("full").cost(6, 2) == 11


def test_halving_after_the_prefilter_halves_the_kept_candidates() -> None:
    scorer = BudgetScorer({}, PENALTY)
    records = list(greedy("halving", keep=4).search(6, 1, scorer, similarity=SimilarityOf(STEPS)))
    # kept by block influence: 1, 2, 3, 4 at 0.1; the better two (3, 1) at 0.2
    assert [sorted(s[0] for s in sets) for _, sets in scorer.calls] == [[1, 2, 3, 4], [1, 3]]
    assert removal_order(records) == (3,)


@pytest.mark.parametrize(("search", "fraction", "variant"), [
    ("full", None, ""), ("halving", None, "halving-0.1"), ("halving", 0.2, "halving-0.2"),
    ("warm", None, "warm-0.25"), ("warm", 0.5, "warm-0.5"),
    ("halving", 0.1234567, "halving-0.1234567"),  # exact: two fractions, two jobs
])
def test_search_variants_name_the_search_and_its_budget(search, fraction, variant) -> None:
    assert greedy(search, fraction).variant == variant
    assert greedy(search, fraction, keep=3).variant == "-".join(
        ["prefilter-3", *([variant] if variant else [])])


@pytest.mark.parametrize(("search", "fraction", "message"), [
    ("fast", None, "unknown search 'fast'; choose one of: full, halving, warm"),
    ("full", 0.5, "a budget fraction (0.5) is for --search halving or warm"),
    ("halving", 0.0, "budget fraction must be in [0.01, 1], not 0.0"),
    ("halving", 0.005, "budget fraction must be in [0.01, 1], not 0.005"),
    ("warm", 1.5, "budget fraction must be in [0.01, 1], not 1.5"),
    ("halving", float("nan"), "budget fraction must be in [0.01, 1], not nan"),
])
def test_bad_search_settings_are_refused(search, fraction, message) -> None:
    with pytest.raises(GlpError, match=re.escape(message)):
        greedy(search, fraction)


@dataclass(frozen=True)
class Scored:
    score: float
    loss: float = float("nan")


def test_halving_breaks_ties_of_short_fine_tunes_by_the_selection_loss() -> None:
    # Every short fine-tune predicts the majority class (accuracy 0.503 for all): the loss
    # still orders them; layer 1 learns fastest, then 3. The reference tie rule alone would
    # keep the highest layers (5, 4, 3).
    loss = {0: 0.70, 1: 0.60, 2: 0.69, 3: 0.65, 4: 0.68, 5: 0.71}

    def scorer(removal_sets, budget=None):
        return [Scored(0.503, loss[removed[0]]) for removed in removal_sets]

    records = list(greedy("halving").search(6, 1, scorer))
    rung = {r.budget: sorted(x.layer for x in candidates(records, 0) if x.budget == r.budget)
            for r in candidates(records, 0)}
    assert rung == {0.1: [0, 1, 2, 3, 4, 5], 0.2: [1, 3, 4], 0.4: [1, 3]}
    assert removal_order(records) == (1,)
    # A higher score still wins over a lower loss, and a NaN loss ranks last among ties.
    assert rank_by_score_then_loss([(0, 0.51, 0.9), (1, 0.503, 0.1), (2, 0.503, float("nan")),
                                    (3, 0.503, 0.2)]) == [0, 1, 3, 2]
    # The full search keeps the reference rule: the tie goes to the highest layer.
    assert removal_order(list(greedy("full").search(6, 1, scorer))) == (5,)
