"""The options of ``glp prune``, ``compare`` and ``compress``, and their way to the flows.

``prune``'s options are defined once here (each is a field of :class:`flows.params.PruneParams`,
and a test checks that their defaults agree); ``compare`` and ``compress`` take them and add
their own; ``compress`` adds every registered method's parameters, generated from the
method's dataclass (:mod:`glp.methods`). This module imports no flow (and no torch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated

import typer

from glp.methods import BUDGET_FIELDS, BUDGETS, compressor_options, compressors, get_method
from glp.methods import names as method_names

# Options whose flow parameter is spelt differently, and the way back for error lines.
RENAMED = {"text_column": "text_columns", "lr": "learning_rate", "register": "register_models"}
OPTION_NAMES = {param: f"--{option.replace('_', '-')}" for option, param in RENAMED.items()}


HomeOption = Annotated[
    str | None,
    typer.Option("--home", envvar="GLP_HOME", help="run home for every artifact [default: ./.glp]"),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")]


def prune_options(
    model: Annotated[str, typer.Option(help="model directory or hub id")] = "all-MiniLM-L6-v2",
    task: Annotated[str | None, typer.Option(help="GLUE task: sst2, mrpc, rte, cola, stsb, qnli, "
                                             "qqp, mnli (case-insensitive) [default: sst2]")]
    = None,
    data_dir: Annotated[str | None, typer.Option(help="folder of GLUE task folders "
                                                 "[default: the shipped data/glue]")] = None,
    train_file: Annotated[str | None, typer.Option(help="your training data (CSV/TSV/JSON/"
                                                   "Parquet) or a datasets id")] = None,
    dev_file: Annotated[str | None, typer.Option(help="your evaluation data")] = None,
    text_column: Annotated[list[str] | None, typer.Option(help="text column (twice for pairs)")]
    = None,
    label_column: Annotated[str, typer.Option(help="label column of your data")] = "label",
    task_type: Annotated[str | None, typer.Option(help="your data: classification or regression "
                                                  "[default: classification]")] = None,
    metric: Annotated[str | None, typer.Option(help="selection metric: accuracy, f1, mcc, "
                                               "pearson, spearman")] = None,
    remove: Annotated[int, typer.Option(help="encoder layers to remove")] = 2,
    strategy: Annotated[str, typer.Option(help=", ".join(method_names("layers")))] = "greedy",
    prefilter_keep: Annotated[int, typer.Option(help="greedy: fine-tune only the m candidates "
                                                "with the lowest block influence [0: all]")]
    = 0,
    search: Annotated[str, typer.Option(help="greedy: full (the reference: every candidate "
                                        "for the whole budget), halving (successive halving) "
                                        "or warm (candidates repaired from one fine-tuned "
                                        "full model; a variant)")] = "full",
    search_fraction: Annotated[float | None, typer.Option(help="greedy: the share of the "
                                                          "budget of halving's first rung "
                                                          "(0.1) or of warm's repair (0.25)")]
    = None,
    random_seed: Annotated[int, typer.Option(help="random: seed of the random order")] = 0,
    exhaustive_limit: Annotated[int, typer.Option(help="exhaustive: refuse searches needing "
                                                  "more fine-tunes")] = 64,
    train_limit: Annotated[int | None, typer.Option(help="training examples used "
                                                    "[default: all]")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="dev examples used [default: all]")]
    = None,
    epochs: Annotated[float, typer.Option(help="fine-tune epochs")] = 3.0,
    max_length: Annotated[int, typer.Option(help="max tokens per example")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="learning rate")] = 2e-5,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 32,
    max_grad_norm: Annotated[float, typer.Option(help="clip the gradient norm (the HF "
                                                 "Trainer's 1.0; 0 turns clipping off)")]
    = 1.0,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N")]
    = "auto",
    precision: Annotated[str, typer.Option(help="fp32, or bf16 / fp16 autocast on a GPU")]
    = "fp32",
    length_grouping: Annotated[bool, typer.Option(help="batch examples of similar length "
                                                  "(about 1.3x faster on a CPU)")] = True,
    keep_candidates: Annotated[bool, typer.Option(help="keep every search candidate's weights "
                                                  "(by default only final models are kept)")]
    = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow a model that runs its own code "
                                                    "(auto_map in its config)")] = False,
    seeds: Annotated[int, typer.Option(help="seeds per final model (40, 41, ...)")] = 5,
    distill: Annotated[bool, typer.Option(help="also fine-tune every pruned depth with "
                                          "knowledge distillation from the unpruned "
                                          "fine-tuned model (variant kd)")] = False,
    distill_temperature: Annotated[float, typer.Option(help="--distill: the softmax "
                                                       "temperature of the teacher's targets")]
    = 2.0,
    search_seed: Annotated[int, typer.Option(help="seed of the candidate fine-tunes")] = 41,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI "
                                                     "[default: sqlite in the home]")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "glp",
    registered_model: Annotated[str | None, typer.Option(help="registry name [default: "
                                                         "glp-<model>-<task>-<strategy>]")]
    = None,
    register: Annotated[bool, typer.Option(help="register the final models")] = True,
    task_runner: Annotated[str, typer.Option(help="where fine-tunes run: sequential, threads:N, "
                                             "dask[:N] (local worker processes), "
                                             "dask:tcp://HOST:8786, ray, ray:ray://HOST:10001")]
    = "sequential",
    home: HomeOption = None,
    verbose: Verbose = False,
) -> None:
    """The options of ``glp prune``: the definition ``compare`` and ``compress`` take
    theirs from (the command is :func:`flows.cli.prune`)."""


def _params(values: dict) -> dict:
    """CLI option values as flow parameters."""
    params = {RENAMED.get(k, k): v for k, v in values.items()}
    params["text_columns"] = tuple(params.get("text_columns") or ())
    # Left out when not given, so that the flow can tell an option the user typed (and
    # refuse one that would be ignored) from a default.
    for name in ("task", "task_type", "metric"):
        if params.get(name) is None:
            params.pop(name, None)
    return params


COMPARE_SIZES = {"density": (0.5, 0.3), "ratio": (2.0, 4.0), "constraint": (0.6, 0.4)}
"""``glp compare --methods``' sizes of each budget (glp.methods.BUDGETS) by default."""


def budget_options(default: Callable[[str], str], prefix: str = "") -> list[inspect.Parameter]:
    """One repeatable option per budget (``--density``, ``--ratio``, ``--constraint``),
    its help naming the methods it sizes; ``default(budget)`` ends the help."""
    options = []
    for budget, meaning in BUDGETS.items():
        users = [m.name for m in compressors() if m.budget == budget]
        if not users:
            continue
        options.append(inspect.Parameter(
            budget, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                list[float] | None, typer.Option(help=(
                    f"{prefix}{', '.join(users)}: {meaning} (repeat for several: --{budget} "
                    f"{COMPARE_SIZES[budget][0]:g} --{budget} {COMPARE_SIZES[budget][1]:g}) "
                    f"{default(budget)}"))]))
    return options


def budget_values(values: dict) -> dict[str, tuple[float, ...]]:
    """The flows' size parameters (``densities``, ...) from the budget options typed,
    popped from ``values``."""
    sizes = {budget: values.pop(budget, None) for budget in BUDGETS}
    return {BUDGET_FIELDS[b]: tuple(v) for b, v in sizes.items() if v}


def compare_signature() -> inspect.Signature:
    """``prune``'s options without --strategy, --register and --registered-model (each
    strategy and method is registered under its own name), plus --strategies and
    --random-orders; one definition of the shared options for both commands."""
    shared = [p for name, p in inspect.signature(prune_options, eval_str=True).parameters.items()
              if name not in ("strategy", "register", "registered_model")]
    extra = [
        inspect.Parameter("strategies", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            str | None, typer.Option(help="comma-separated: " + ", ".join(method_names("layers"))
                                     + " [default: all]")],
            default=None),
        inspect.Parameter("methods", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            str | None, typer.Option(help="instead of --strategies, comma-separated: layer "
                                     "strategies, mlpruning, grain, lowrank, autoencoder, "
                                     "and compositions such as greedy+lowrank or "
                                     "greedy+mlpruning+lowrank (greedy's model of L - "
                                     "--remove layers, then each step)")],
            default=None),
        *budget_options(lambda budget: "[default: " + " ".join(
            f"{v:g}" for v in COMPARE_SIZES[budget]) + "]", prefix="--methods: "),
        inspect.Parameter("pruning_epochs", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            list[str] | None, typer.Option(help="--methods: width methods' epochs of "
                                           "training while pruning: EPOCHS for all, or "
                                           "METHOD=EPOCHS, e.g. grain=3 (repeat for "
                                           "several) [default: mlpruning 2, grain 20]")],
            default=None),
        inspect.Parameter("random_orders", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            int, typer.Option(help="random: how many random orders (seeds 0, 1, ...)")],
            default=3),
        inspect.Parameter("register_compare", inspect.Parameter.KEYWORD_ONLY,
                          annotation=Annotated[bool, typer.Option(
                              "--register/--no-register",
                              help="register every strategy's and method's final models")],
                          default=False),
    ]
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared]
    return inspect.Signature(extra + keyword)


SEARCH_ONLY = ("strategy", "register", "prefilter_keep", "search", "search_fraction",
               "random_seed", "exhaustive_limit",
               "remove", "search_seed", "keep_candidates", "seeds", "distill",
               "distill_temperature")
"""``prune`` options that mean nothing to a width method (compress has its own --seeds)."""


def method_options() -> dict[str, list[tuple[str, object]]]:
    """Every compressor's own parameters by option name: (method name, field) pairs; none
    may take the name of a ``prune`` option."""
    found = {option: [(method.name, spec) for method, spec in users]
             for option, users in compressor_options().items()}
    clash = sorted(set(found) & {*SEARCH_ONLY, *RENAMED})
    assert not clash, clash
    return found


def _option_type(method_name: str, field) -> object:
    """The CLI type of a parameter field (tuples become repeatable options)."""
    import typing

    hint = typing.get_type_hints(get_method(method_name).params)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) \
        else hint
    if typing.get_origin(base) is tuple:
        return list[typing.get_args(base)[0]] | None
    return base | None


def compress_signature() -> inspect.Signature:
    """``prune``'s model, data and budget options (not the search's), the method and its
    sizes, and every compressor's own parameters, generated from their dataclasses (one
    definition of each option: glp.methods)."""
    shared = [p for name, p in inspect.signature(prune_options, eval_str=True).parameters.items()
              if name not in SEARCH_ONLY]

    def option(name, annotation, default, help_text, *flags):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=Annotated[annotation, typer.Option(*flags,
                                                                               help=help_text)])

    def defaults(users) -> str:
        shown = [f"{m} {f.default!r}" if isinstance(f.default, str) else
                 f"{m} {','.join(f.default) if isinstance(f.default, tuple) else f.default}"
                 for m, f in users]
        return "; ".join(shown)

    extra = [
        option("method", str, "mlpruning", "the method: " + ", ".join(
            method_names(("width", "offline")))),
        *budget_options(lambda budget: "[default: the method's]"),
        option("seeds", int, 1, "seeds per compressed model (40, 41, ...)"),
        option("prune_layers", int, 0, "remove this many layers by greedy layer pruning "
               "first, then compress the pruned model"),
        option("register_compress", bool, True, "register each size's model (ONNX)",
               "--register/--no-register"),
    ]
    for name, users in method_options().items():
        help_text = users[0][1].metadata.get("help", "")
        owners = ", ".join(m for m, _ in users)
        extra.append(option(name, _option_type(*users[0]), None,
                            f"{owners}: {help_text} [default: {defaults(users)}]"))
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared]
    return inspect.Signature(extra + keyword)


