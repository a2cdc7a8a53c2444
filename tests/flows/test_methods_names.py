"""``--methods`` names: what is accepted, and the one line for what is not."""

from __future__ import annotations

import pytest

from flows.methods import compressor_names, layer_strategies, parse_methods
from glp import GlpError


def test_methods_are_parsed_in_order_without_duplicates():
    names = parse_methods("greedy, top,MLPruning,lowrank,greedy+lowrank,top")
    assert names == ("greedy", "top", "mlpruning", "lowrank", "greedy+lowrank")
    assert compressor_names(names) == ("mlpruning", "lowrank", "greedy+lowrank")
    assert layer_strategies(("mlpruning", "greedy+lowrank")) == ("greedy",)
    assert parse_methods(["greedy+mlpruning+lowrank"]) == ("greedy+mlpruning+lowrank",)


@pytest.mark.parametrize(("value", "message"), [
    ("greedy,svd", "--methods svd: unknown method 'svd'; choose from greedy, top"),
    ("", "--methods: no method given"),
    ("greedy,,top", "--methods greedy,,top: an empty name between commas"),
    ("greedy,top,", "--methods greedy,top,: an empty name between commas"),
    ("top+lowrank", "a composition starts with greedy"),
    ("greedy+lowrank+mlpruning", "a width method cannot follow lowrank"),
    ("greedy+mlpruning+mlpruning", "a width method cannot follow mlpruning"),
    ("grain+lowrank", "an offline method cannot follow grain"),
    ("greedy+top", "top is a layer strategy; it can only come first"),
])
def test_a_bad_method_is_one_line_naming_it(value, message):
    with pytest.raises(GlpError, match=message.replace("+", r"\+")):
        parse_methods(value)


@pytest.mark.parametrize("value", ["greedy+grain"])
def test_grain_after_another_step_is_refused(value):
    with pytest.raises(GlpError, match="grain starts from the unpruned model"):
        parse_methods(value)


def test_spaces_around_a_step_are_allowed():
    assert parse_methods("greedy + lowrank") == ("greedy+lowrank",)


@pytest.mark.parametrize(("options", "message"), [
    ({"methods": "greedy,lowrank", "densities": (0.3,)},
     "--density sizes mlpruning and grain; --methods greedy,lowrank has none of them"),
    ({"methods": "greedy,mlpruning", "ratios": (4.0,)},
     "--ratio sizes lowrank and autoencoder; --methods greedy,mlpruning has none of them"),
    ({"methods": "greedy,lowrank", "pruning_epochs": 3.0},
     "--pruning-epochs '3.0' trains a width method; --methods greedy,lowrank has none"),
    ({"methods": "greedy,mlpruning", "pruning_epochs": "grain=3"},
     "--pruning-epochs 'grain=3' trains a width method; --methods greedy,mlpruning has no "
     "grain"),
    ({"methods": "grain", "pruning_epochs": "lowrank=3"}, "'lowrank' takes no pruning epochs"),
    ({"methods": "grain", "pruning_epochs": "grain=0"}, "expected EPOCHS > 0 or METHOD="),
    ({"methods": "grain", "pruning_epochs": "three"}, "expected EPOCHS > 0 or METHOD="),
    ({"methods": "top,mlpruning", "search": "warm"}, "--methods top,mlpruning has no greedy"),
    ({"methods": "mlpruning", "prefilter_keep": 2}, "--methods mlpruning has no greedy"),
])
def test_options_methods_would_ignore_are_refused(options, message):
    from flows.compare import CompareParams, preflight

    with pytest.raises(GlpError, match=message):
        preflight(CompareParams(**options))


def test_pruning_epochs_reach_every_width_method_and_only_them():
    from flows.compare import CompareParams
    from flows.comparison import method_configs

    params = CompareParams(methods="greedy,mlpruning,grain,lowrank", pruning_epochs=3.0)
    assert [c.epochs for c in method_configs(params, "grain")] == [3.0, 3.0]  # 0.5, 0.3
    assert method_configs(params, "mlpruning")[0].pruning_epochs == 3.0
    assert [c.ratio for c in method_configs(params, "lowrank")] == [2.0, 4.0]
    default = CompareParams(methods="greedy,grain,greedy+mlpruning")
    assert method_configs(default, "grain")[0].epochs == 20.0
    one = default.model_copy(update={"pruning_epochs": ("GRAIN=3",)})
    assert method_configs(one, "grain")[0].epochs == 3.0
    assert method_configs(one, "mlpruning")[0].pruning_epochs == 2.0


def test_a_composition_costs_what_it_was_built_on():
    from flows.compare import method_costs

    def row(strategy, method, seconds, **extra):
        return {"strategy": strategy, "method": method, "variant": "",
                "fine_tune_seconds": seconds, **extra}

    rows = [row("unpruned", "unpruned", 10.0, depth=6),
            row("greedy", "layers", 7.0, depth=5),
            row("greedy", "layers", 10.0, depth=4), row("greedy", "layers", 10.0, depth=4),
            row("mlpruning", "mlpruning", 30.0),
            row("greedy+mlpruning", "greedy+mlpruning", 20.0, _prior_seconds=0.0),
            row("greedy+mlpruning+lowrank", "greedy+mlpruning+lowrank", 1.0,
                _prior_seconds=40.0)]
    costs = method_costs(rows, {"greedy": {"seconds": 100.0}})
    assert costs["greedy"]["seconds"] == 127.0
    assert costs["mlpruning"]["seconds"] == 30.0
    # greedy's search (100) and finals at the depth it starts from (20), and its own 20
    assert costs["greedy+mlpruning"]["seconds"] == 140.0
    assert costs["greedy+mlpruning+lowrank"]["seconds"] == 161.0  # + the mlpruning step's 40
    assert costs["greedy+mlpruning+lowrank"]["equivalents"] == 16.1


def test_an_intermediate_step_counts_only_the_size_the_next_one_uses():
    from flows.methods import run_chain

    def step(method, source):
        return [{"target_density": d, "fine_tune_seconds": 10.0, "diverged": False,
                 "_checkpoint": f"{method}-{d}-{seed}", "selection_value": 0.5, "seed": seed}
                for d in (0.5, 0.3) for seed in (40, 41)]

    rows = run_chain("mlpruning+lowrank", "teacher", list, step)
    assert {r["_prior_seconds"] for r in rows} == {20.0}  # density 0.5's two seeds


@pytest.mark.parametrize(("values", "expected"), [
    (("grain=5", "3"), {"mlpruning": 3.0, "grain": 5.0}),
    (("3", "grain=5"), {"mlpruning": 3.0, "grain": 5.0}),
    (("mlpruning=1",), {"mlpruning": 1.0}),
])
def test_a_method_s_pruning_epochs_win_over_a_bare_number_in_any_order(values, expected):
    from flows.compare import CompareParams
    from flows.comparison import pruning_epochs

    params = CompareParams(methods="mlpruning,grain", pruning_epochs=values)
    assert pruning_epochs(params) == expected


@pytest.mark.parametrize("values", [("grain=5", "grain=3"), ("3", "4")])
def test_pruning_epochs_given_twice_are_refused(values):
    from flows.compare import CompareParams
    from flows.comparison import pruning_epochs

    with pytest.raises(GlpError, match=f"--pruning-epochs '{values[0]}' and '{values[1]}'"):
        pruning_epochs(CompareParams(methods="mlpruning,grain", pruning_epochs=values))


def test_typing_a_default_pruning_epochs_is_the_same_job():
    from flows.compare import CompareParams
    from flows.comparison import pruning_identity

    assert pruning_identity(CompareParams(methods="grain", pruning_epochs="grain=20")) == ()
    assert pruning_identity(CompareParams(methods="grain,mlpruning", pruning_epochs="2")) == (
        [("grain", 2.0)],)


@pytest.mark.parametrize(("method", "name"), [
    ("mlpruning", "glp-tiny-sst2-mlpruning"),  # glp compress --method mlpruning's name
    ("lowrank", "glp-tiny-sst2-lowrank"),
    ("greedy+lowrank", "glp-tiny-sst2-greedy2-lowrank"),  # glp compress --prune-layers 2's
    ("greedy+mlpruning", "glp-tiny-sst2-greedy2-mlpruning"),
    # a middle step's size is in the name: the aliases name only the last step's
    ("greedy+mlpruning+lowrank", "glp-tiny-sst2-greedy2-mlpruning50-lowrank"),
    ("mlpruning+lowrank", "glp-tiny-sst2-mlpruning50-lowrank"),
])
def test_each_compressor_registers_under_its_own_name(method, name):
    from flows.comparison import method_registry_name

    assert method_registry_name("tiny", "sst2", method, 2, {"density": 0.5, "ratio": 2.0}) == name


def test_one_registered_name_for_a_whole_comparison_is_refused():
    from flows.compare import CompareParams, preflight

    with pytest.raises(GlpError, match="--registered-model mine: compare registers each"):
        preflight(CompareParams(methods="greedy,mlpruning", registered_model="mine"))


def test_a_comparison_of_layer_strategies_describes_no_sizes():
    from flows.compare import CompareParams, preflight

    described = preflight(CompareParams(methods="greedy,top", remove=1, train_limit=40))
    assert described.startswith("compare greedy, top: remove 1..1 of 6 layers, of ")
    assert "density" not in described and ", ," not in described
