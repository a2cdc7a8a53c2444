"""The ``glp`` command line: it parses the options and hands each command to the code that
does it (flows.launch runs a flow, glp.report.terminal prints the tables).

Prefect reads its settings when it is first imported, so this module sets up the run
home's environment first and imports the flows only inside the commands.
"""

from __future__ import annotations

import inspect
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.launch import console
from flows.launch import fail as _fail
from glp import GlpError
from glp.methods import compressors, get_method
from glp.methods import names as method_names
from tasks.home import RunHome, configure_environment

app = typer.Typer(
    name="glp",
    help="Greedy layer pruning for transformer encoders: smaller, faster models for one task.",
    no_args_is_help=True,
    rich_markup_mode=None,  # help texts are plain: "[default: sst2]" is not a markup tag
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Options whose flow parameter is spelt differently, and the way back for error lines.
RENAMED = {"text_column": "text_columns", "lr": "learning_rate", "register": "register_models"}
OPTION_NAMES = {param: f"--{option.replace('_', '-')}" for option, param in RENAMED.items()}


def user_message(exc: GlpError, values: dict) -> str:
    """The error as the user typed it: a parameter named by the library (``beta 1.0: ...``)
    becomes the option of the command (``--ema 1.0: ...``)."""
    from glp.core.errors import ParamError

    if not isinstance(exc, ParamError):
        return str(exc)
    chosen = [m for m in compressors() if m.name == values.get("method")] or compressors()
    for method in chosen:
        for option, field in method.options().items():
            if field.name == exc.param:
                return exc.for_option(f"--{option.replace('_', '-')}")
    return exc.for_option(OPTION_NAMES.get(exc.param, f"--{exc.param.replace('_', '-')}"))


def run_command(kind: str, values: dict, home: str | None, verbose: bool) -> None:
    """Run the ``prune``, ``compare`` or ``compress`` flow (flows.launch.run_command), its
    errors worded with the options of the command line."""
    from flows.launch import run_command as launch

    launch(kind, values, home, verbose, option_names=OPTION_NAMES, explain=user_message)


HomeOption = Annotated[
    str | None,
    typer.Option("--home", envvar="GLP_HOME", help="run home for every artifact [default: ./.glp]"),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")]


@app.command()
def prune(
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
    """Remove encoder layers one at a time and keep a fine-tuned model for every depth.

    Defaults follow the paper's protocol (full training set, 3 epochs, lr 2e-5, 5 seeds);
    see `glp demo` for a run sized for a laptop CPU.
    """
    values = dict(locals())
    home, verbose = values.pop("home"), values.pop("verbose")
    run_command("prune", _params(values), home, verbose)


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


def compare(strategies: str | None, methods: str | None, density: list[float] | None,
            ratio: list[float] | None, pruning_epochs: list[str] | None, random_orders: int,
            **options) -> None:
    """Compare layer strategies, or every compression method, on one model and task.

    Takes every option of `glp prune` (except --strategy). --strategies runs layer strategies at every depth; --methods runs layer strategies, width methods (mlpruning, grain), offline ones (lowrank, autoencoder) and compositions (greedy+lowrank, greedy+mlpruning+lowrank, ...), each model timed in PyTorch and onnxruntime (fp32, int8) at batch 1 and 32. Writes the finals (with strategy and method columns) to parquet/finals/ and a markdown report with PNG plots (with --methods: methods.md and two Pareto plots) to reports/ in the run home.
    """  # noqa: E501 - one line, so that --help wraps it to the terminal
    home, verbose = options.pop("home"), options.pop("verbose")
    options.pop("strategy", None)
    options["register"] = options.pop("register_compare")
    values = {**_params(options), "random_orders": random_orders,
              "command": "glp compare " + " ".join(shlex.quote(a) for a in sys.argv[2:])}
    given = {"strategies": strategies, "methods": methods,
             "densities": tuple(density) if density else None,
             "ratios": tuple(ratio) if ratio else None,
             "pruning_epochs": tuple(pruning_epochs) if pruning_epochs else None}
    values |= {k: v for k, v in given.items() if v is not None}  # unset: not typed
    if methods is None and (density or ratio or pruning_epochs):
        typed = ("--density sizes a width method" if density else
                 "--ratio sizes an offline method" if ratio else
                 "--pruning-epochs trains a width method")
        _fail(f"{typed}; give --methods too (e.g. --methods greedy,mlpruning,lowrank)")
    run_command("compare", values, home, verbose)


def _compare_signature() -> inspect.Signature:
    """``prune``'s options without --strategy, --register and --registered-model (each
    strategy and method is registered under its own name), plus --strategies and
    --random-orders; one definition of the shared options for both commands."""
    shared = [p for name, p in inspect.signature(prune, eval_str=True).parameters.items()
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
        inspect.Parameter("density", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            list[float] | None, typer.Option(help="--methods: width methods keep this "
                                             "fraction of the encoder weights (repeat for "
                                             "several) [default: 0.5 0.3]")],
            default=None),
        inspect.Parameter("ratio", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            list[float] | None, typer.Option(help="--methods: offline methods' compression "
                                             "ratio (repeat for several) [default: 2 4]")],
            default=None),
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


compare.__signature__ = _compare_signature()
app.command(name="compare")(compare)


SEARCH_ONLY = ("strategy", "register", "prefilter_keep", "search", "search_fraction",
               "random_seed", "exhaustive_limit",
               "remove", "search_seed", "keep_candidates", "seeds", "distill",
               "distill_temperature")
"""``prune`` options that mean nothing to a width method (compress has its own --seeds)."""


def compress(method: str, density: list[float] | None, ratio: list[float] | None,
             prune_layers: int, **options) -> None:
    """Compress a model with one method: in width (to a --density) or offline (to a --ratio, no fine-tuning).

    Takes `glp prune`'s model, data and budget options, and each method's own (generated from its parameters, glp.methods). --model is compressed as it is when it is fine-tuned for a task (a directory or models:/NAME@alias), else fine-tuned first; --prune-layers K prunes K layers greedily first. Each model is saved with its plan (glp.load_pretrained reloads it), registered in MLflow as ONNX, and written to parquet/finals/.
    """  # noqa: E501 - one line, so that --help wraps it to the terminal
    home, verbose = options.pop("home"), options.pop("verbose")
    options["register"] = options.pop("register_compress")
    own = {name: options.pop(name) for name in method_options()}
    values = {**_params(options), "method": method, "prune_layers": prune_layers,
              "options": {k: v for k, v in own.items() if v is not None}}
    if density:
        values["densities"] = tuple(density)
    if ratio:
        values["ratios"] = tuple(ratio)
    run_command("compress", values, home, verbose)


def method_options() -> dict[str, list[tuple[str, object]]]:
    """Every compressor's own parameters by option name: (method, dataclass field) pairs."""
    import dataclasses

    found: dict[str, list[tuple[str, object]]] = {}
    for method in compressors():
        for option, field in method.options().items():
            if option != method.budget:
                found.setdefault(option, []).append((method.name, field))
    for option, users in found.items():
        assert option not in SEARCH_ONLY and option not in RENAMED, option
        assert all(isinstance(f, dataclasses.Field) for _, f in users)
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


def _compress_signature() -> inspect.Signature:
    """``prune``'s model, data and budget options (not the search's), the method and its
    sizes, and every compressor's own parameters, generated from their dataclasses (one
    definition of each option: glp.methods)."""
    shared = [p for name, p in inspect.signature(prune, eval_str=True).parameters.items()
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
        option("density", list[float] | None, None, "width methods: fraction of the encoder "
               "weights to keep (repeat for several: --density 0.5 --density 0.3) "
               "[default: the method's]"),
        option("ratio", list[float] | None, None, "offline methods: compression ratio of each "
               "compressed module type (repeat for several) [default: the method's]"),
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


compress.__signature__ = _compress_signature()
app.command(name="compress")(compress)


@app.command()
def export(
    model_dir: Annotated[str, typer.Argument(help="a model directory saved by glp")],
    onnx: Annotated[bool, typer.Option("--onnx", help="write an ONNX graph (the only format)")]
    = False,
    out: Annotated[str | None, typer.Option(help="the file to write [default: "
                                            "MODEL_DIR/model.onnx, or model.int8.onnx]")]
    = None,
    int8: Annotated[bool, typer.Option(help="dynamic int8 quantisation (onnxruntime)")] = False,
    check: Annotated[bool, typer.Option(help="compare the graph's logits with PyTorch's")]
    = True,
) -> None:
    """Export a saved (compressed) model to ONNX, to run under onnxruntime without glp."""
    from glp.deploy.export import compare_with_torch, export_onnx

    if not onnx:
        _fail("glp export needs a format: --onnx")
    target = out or str(Path(model_dir) / ("model.int8.onnx" if int8 else "model.onnx"))
    try:
        path = export_onnx(model_dir, target, int8=int8)
        message = f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)"
        if check:
            difference = compare_with_torch(model_dir, path)
            message += f"; max |logit difference| vs PyTorch {difference:.2e}"
    except GlpError as exc:
        _fail(user_message(exc, {}))
    console.print(message)


@app.command()
def bench(
    models: Annotated[list[str], typer.Argument(help="model directories saved by glp, or "
                                                "registered versions models:/NAME@alias")],
    batch_size: Annotated[list[int] | None, typer.Option(
        help="batch sizes (repeatable; default: 1 and 32)")] = None,
    length: Annotated[list[int] | None, typer.Option(
        help="sequence lengths (repeatable; default: 32 and 128)")] = None,
    repeats: Annotated[int, typer.Option(help="timed runs per model and shape")] = 20,
    threads: Annotated[int | None, typer.Option(help="CPU threads for PyTorch and "
                                                "onnxruntime (default: the cores this "
                                                "process may use)")] = None,
    onnx: Annotated[bool, typer.Option(help="also time each model exported to ONNX, fp32 "
                                       "and int8 (onnxruntime)")] = True,
    out: Annotated[str | None, typer.Option(help="also write the rows as JSON here")] = None,
    home: HomeOption = None,
) -> None:
    """CPU latency of models side by side: median and p90 per batch size and length, in
    PyTorch and (with --onnx) onnxruntime fp32 and int8, the models interleaved."""
    import json

    from glp.deploy.runtimes import check_bench, time_models, versions
    from glp.report.terminal import print_bench

    batch_size, length = batch_size or [1, 32], length or [32, 128]
    threads = threads or len(os.sched_getaffinity(0))
    try:
        check_bench(batch_size, length, repeats, threads)
        paths = {spec: _local_model(spec, home) for spec in models}
        rows = time_models(paths, [(b, n) for b in batch_size for n in length],
                           repeats=repeats, threads=threads, onnx=onnx)
    except GlpError as exc:
        _fail(user_message(exc, {}))
    setting = {"threads": threads, **versions()}
    print_bench(console, rows, f"threads {threads}, torch {setting['torch']}, onnxruntime "
                f"{setting['onnxruntime']}, {repeats} interleaved rounds, synthetic batches "
                "(no padding)")
    if out:
        Path(out).write_text(json.dumps({**setting, "rows": rows}, indent=1) + "\n")


def _local_model(spec: str, home: str | None) -> str:
    """A model directory, or a registered version downloaded into the run home."""
    if not spec.startswith("models:/"):
        return spec
    from flows.sources import download_registered

    run_home = RunHome.resolve(home)
    return download_registered(spec, run_home.tracking_uri, run_home, option="glp bench",
                               use="time")


@app.command()
def pick(
    max_latency_ms: Annotated[float | None, typer.Option(
        help="slowest latency allowed (ms, as the run measured it)")] = None,
    min_speedup: Annotated[float | None, typer.Option(
        help="speed-up over the unpruned model, measured beside it")] = None,
    min_metric: Annotated[float | None, typer.Option(
        help="quality floor on the dev metric (mean over seeds)")] = None,
    max_parameters: Annotated[int | None, typer.Option(help="most parameters allowed")]
    = None,
    task: Annotated[str | None, typer.Option(help="only this task's models")] = None,
    model: Annotated[str | None, typer.Option(help="only models of this base model")] = None,
    job: Annotated[str | None, typer.Option(help="only this job's models (its id)")] = None,
    alias: Annotated[str | None, typer.Option(help="point this registry alias (e.g. "
                                              "production) at the chosen version")] = None,
    home: HomeOption = None,
) -> None:
    """The best final model that meets a budget, from a run home's results.

    With a speed or size limit: the best dev metric among the models within it; with only
    --min-metric: the fastest model that reaches it. Prints the chosen model, its plan and
    its measured numbers; the last line is its registry URI (models:/NAME/VERSION) or, if
    it was not registered, its model directory. Nothing meets the budget: one line naming
    the closest model, exit 1.
    """
    from glp.report.pick import Budget, NothingMeets, choose
    from glp.report.terminal import print_pick
    from tasks.picking import point_alias, read_finals

    run_home = RunHome.resolve(home)
    try:
        budget = Budget(max_latency_ms, min_speedup, min_metric, max_parameters)
        chosen, meeting = choose(read_finals(run_home), budget, str(run_home.root),
                                 task=task, model=model, job=job)
    except NothingMeets as exc:
        _fail(str(exc), code=1)
    except GlpError as exc:
        _fail(user_message(exc, {}))
    print_pick(console, budget, chosen, meeting)
    if alias:
        try:
            done = point_alias(run_home, chosen, alias)
        except GlpError as exc:
            _fail(str(exc))
        console.print(done, markup=False, highlight=False)
    print(chosen.uri)


@app.command()
def demo(home: HomeOption = None, verbose: Verbose = False) -> None:
    """Greedy pruning of the embedded MiniLM on SST-2, sized for a laptop CPU (~10 minutes).

    2,000 training examples, 1 epoch, max length 64, lr 1e-4, 2 of 6 layers, 1 seed.
    """
    from flows.serve import DEMO_PARAMS

    run_command("prune", dict(DEMO_PARAMS), home, verbose)


@app.command()
def gc(
    home: HomeOption = None,
    finals: Annotated[bool, typer.Option(help="also remove the final models' checkpoints and "
                                         "the cached task results (re-runs recompute)")]
    = False,
    dry_run: Annotated[bool, typer.Option(help="list what would be removed")] = False,
) -> None:
    """Free the disk space a run home holds that no run needs.

    Removes search candidates' weights, half-written checkpoints of stopped processes and
    the tokenisation cache. Never touches the MLflow store, the registered models or the
    Parquet tables.
    """
    from glp.report.terminal import print_garbage
    from tasks.home import collect_garbage, folder_size

    run_home = RunHome.resolve(home)
    if not run_home.root.is_dir():
        _fail(f"--home {run_home.root}: no such folder (nothing to clean)")
    if not (run_home.artifacts.is_dir() or run_home.mlflow_db.exists()):
        _fail(f"--home {run_home.root}: not a glp run home (no artifacts/ or mlflow.db)")
    before = folder_size(run_home.root)
    print_garbage(console, collect_garbage(run_home, finals=finals, dry_run=dry_run), before,
                  dry_run)


@app.command()
def ui(
    home: HomeOption = None,
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000,
) -> None:
    """Serve the MLflow UI for the run home on 127.0.0.1 (runs, metrics, registered models)."""
    run_home = RunHome.resolve(home)
    if not run_home.mlflow_db.exists():
        _fail(f"no MLflow store at {run_home.mlflow_db}; run `glp prune` or `glp demo` first, "
              "or pass --home")
    console.print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
               str(port), "--backend-store-uri", run_home.tracking_uri]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    raise typer.Exit(subprocess.call(command, env=env))


@app.command()
def serve(
    home: HomeOption = None,
    port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
    host: Annotated[str, typer.Option(help="bind address (loopback unless --allow-remote)")]
    = "127.0.0.1",
    pool: Annotated[str, typer.Option(help="process work pool")] = "glp-process",
    deploy: Annotated[bool, typer.Option(help="deploy prefect.yaml's deployments")] = True,
    allow_remote: Annotated[bool, typer.Option(help="allow a non-loopback --host (the server "
                                               "has no authentication)")] = False,
    limit: Annotated[int, typer.Option(help="flow runs the worker runs at once")] = 1,
    ui: Annotated[bool, typer.Option(help="serve Prefect's UI")] = True,
) -> None:
    """A Prefect server, the scheduled deployments and a worker on this machine; Ctrl-C stops
    them all.

    Starts `prefect server start` on 127.0.0.1, creates the process work pool, deploys
    prefect.yaml (nightly prune, weekly compare) and runs a worker until interrupted.
    """
    run_home = RunHome.resolve(home)
    configure_environment(run_home)
    from flows.serve import serve as serve_all

    try:
        code = serve_all(run_home.root, port=port, host=host, pool=pool, deploy=deploy,
                         allow_remote=allow_remote, limit=limit, ui=ui, echo=console.print)
    except GlpError as exc:
        _fail(user_message(exc, {}))
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
