"""One definition of every option: the CLI's options and the flows' parameters agree."""

from __future__ import annotations

import inspect

from flows.compare import CompareParams
from flows.compress import CompressParams
from flows.options import (
    COMPARE_SIZES,
    RENAMED,
    compare_signature,
    compress_signature,
    method_options,
    prune_options,
)
from flows.params import PruneParams
from glp.methods import BUDGET_FIELDS, BUDGETS

# Options the CLI leaves unset (None) so that the flow can tell a typed value from its
# default, and options that are the CLI's own (not flow parameters).
UNSET = {"task", "task_type", "metric", "text_columns"}
CLI_ONLY = {"home", "verbose", "register_compare", "register_compress", *BUDGETS,
            "strategies", "methods", "pruning_epochs", "random_orders"}


def _defaults(signature: inspect.Signature) -> dict:
    return {RENAMED.get(n, n): p.default for n, p in signature.parameters.items()}


def _check(defaults: dict, model) -> None:
    fields = model.model_fields
    for name, default in defaults.items():
        if name in CLI_ONLY:
            continue
        assert name in fields, f"--{name} is not a {model.__name__} field"
        if name in UNSET:
            assert default is None
        else:
            assert default == fields[name].default, (name, default, fields[name].default)


def test_prune_options_are_prune_params():
    _check(_defaults(inspect.signature(prune_options, eval_str=True)), PruneParams)


def test_compare_options_are_compare_params():
    _check(_defaults(compare_signature()), CompareParams)
    fields = CompareParams.model_fields
    assert compare_signature().parameters["random_orders"].default == (
        fields["random_orders"].default)
    for budget, field in BUDGET_FIELDS.items():  # --density ... lists the flow's sizes
        assert fields[field].default == COMPARE_SIZES[budget]
        help_text = compare_signature().parameters[budget].annotation.__metadata__[0].help
        assert help_text.endswith(
            "[default: " + " ".join(f"{v:g}" for v in COMPARE_SIZES[budget]) + "]")


def test_compress_options_are_compress_params_or_a_method_s():
    defaults = _defaults(compress_signature())
    own = set(method_options())
    _check({k: v for k, v in defaults.items() if k not in own}, CompressParams)
    for option in own:  # a method's own option: unset means the method's default
        assert defaults[option] is None
