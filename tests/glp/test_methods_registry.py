"""The method registry: declarations, parameters, labels and order (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from glp import GlpError
from glp.methods import (
    Method,
    ParamError,
    budget_label,
    compressors,
    get_method,
    names,
    param,
    register_method,
    unregister_method,
)


def test_every_builtin_method_is_registered_in_display_order():
    assert names("layers") == ("greedy", "top", "bottom", "random", "exhaustive",
                               "block-influence", "angular")
    assert [m.name for m in compressors()] == ["mlpruning", "grain", "post-training", "lowrank",
                                               "autoencoder"]
    for method in compressors():
        assert method.budget in method.param_names()
        assert method.module.startswith(f"glp.methods.{method.name.replace('-', '_')}.")


def test_parameters_come_from_option_names_and_unknown_ones_are_refused():
    grain = get_method("grain")
    params = grain.make_params({"ema": 0.99, "grain_start": 0.1}, density=0.3)
    assert (params.beta, params.start, params.density) == (0.99, 0.1, 0.3)
    assert grain.make_params({"ema": None}).beta == 0.998  # None: the method's default
    with pytest.raises(GlpError, match="grain has no parameter block_size"):
        grain.make_params({"block_size": 8})


def test_a_bad_value_names_the_parameter_and_maps_to_the_option():
    with pytest.raises(ParamError) as caught:
        get_method("lowrank").make_params(ratio=1.0)
    assert caught.value.param == "ratio"
    assert caught.value.for_option("--ratio").startswith("--ratio 1.0: choose")


def test_labels_and_aliases_name_the_size():
    lowrank = get_method("lowrank")
    assert lowrank.label(lowrank.make_params(ratio=2.5, fisher=True)) == "fisher-ratio-2p5"
    assert get_method("mlpruning").label(get_method("mlpruning").make_params(density=0.3)) \
        == "density-30"
    assert budget_label("ratio", 10.0) == "ratio-10"


def test_unknown_names_list_what_is_valid():
    with pytest.raises(ParamError, match="method 'svd': choose one of mlpruning, grain"):
        get_method("svd", ("width", "offline"))


@dataclass(frozen=True)
class _Params:
    density: float = param(0.5, "kept")


def _run(context, params):  # never called here
    raise AssertionError


def test_a_declaration_is_checked_when_registered():
    with pytest.raises(GlpError, match="budget must be a params field"):
        Method(name="x", family="width", summary="", params=_Params, budget="ratio", run=_run)
    with pytest.raises(GlpError, match="needs"):
        Method(name="x", family="width", summary="", params=_Params, budget="density",
               run=_run, needs=frozenset({"gpu"}))
    with pytest.raises(GlpError, match="letters, digits"):
        register_method(Method(name="a+b", family="width", summary="", params=_Params,
                               budget="density", run=_run))


def test_a_registered_method_is_listed_after_the_builtin_ones_and_can_be_removed():
    method = Method(name="mine", family="offline", summary="", params=_Params,
                    budget="density", run=_run)
    register_method(method)
    try:
        assert names()[-1] == "mine" and get_method("mine") is method
        with pytest.raises(GlpError, match="already registered"):
            register_method(Method(name="mine", family="width", summary="other",
                                   params=_Params, budget="density", run=_run))
    finally:
        unregister_method("mine")
    assert "mine" not in names()
