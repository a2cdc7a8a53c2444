"""The ``glp`` command line: it parses the options and hands each command to the code that
does it (flows.launch runs a flow, glp.report.terminal prints the tables).

Prefect reads its settings when it is first imported, so this module sets up the run
home's environment first and imports the flows only inside the commands.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.launch import console
from flows.launch import fail as _fail
from flows.options import (
    OPTION_NAMES,
    HomeOption,
    Verbose,
    _params,
    budget_values,
    compare_signature,
    compress_signature,
    method_options,
    prune_options,
)
from glp import GlpError
from glp.methods import BUDGET_FIELDS, compressors
from tasks.home import RunHome, configure_environment

app = typer.Typer(
    name="glp",
    help="Greedy layer pruning for transformer encoders: smaller, faster models for one task.",
    no_args_is_help=True,
    rich_markup_mode=None,  # help texts are plain: "[default: sst2]" is not a markup tag
    pretty_exceptions_enable=False,
    add_completion=False,
)
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


@app.command()
def prune(**values) -> None:
    """Remove encoder layers one at a time and keep a fine-tuned model for every depth.

    Defaults follow the paper's protocol (full training set, 3 epochs, lr 2e-5, 5 seeds);
    see `glp demo` for a run sized for a laptop CPU.
    """
    home, verbose = values.pop("home"), values.pop("verbose")
    run_command("prune", _params(values), home, verbose)

prune.__signature__ = inspect.signature(prune_options, eval_str=True)


BUDGET_OF = {field: budget for budget, field in BUDGET_FIELDS.items()}


def compare(strategies: str | None, methods: str | None, pruning_epochs: list[str] | None,
            random_orders: int, **options) -> None:
    """Compare layer strategies, or every compression method, on one model and task.

    Takes every option of `glp prune` (except --strategy). --strategies runs layer strategies at every depth; --methods runs layer strategies, width methods (mlpruning, grain), offline ones (lowrank, autoencoder) and compositions (greedy+lowrank, greedy+mlpruning+lowrank, ...), each model timed in PyTorch and onnxruntime (fp32, int8) at batch 1 and 32. Writes the finals (with strategy and method columns) to parquet/finals/ and a markdown report with PNG plots (with --methods: methods.md and two Pareto plots) to reports/ in the run home.
    """  # noqa: E501 - one line, so that --help wraps it to the terminal
    home, verbose = options.pop("home"), options.pop("verbose")
    options.pop("strategy", None)
    options["register"] = options.pop("register_compare")
    sizes = budget_values(options)
    values = {**_params(options), "random_orders": random_orders,
              "command": "glp compare " + " ".join(shlex.quote(a) for a in sys.argv[2:])}
    given = {"strategies": strategies, "methods": methods, **sizes,
             "pruning_epochs": tuple(pruning_epochs) if pruning_epochs else None}
    values |= {k: v for k, v in given.items() if v is not None}  # unset: not typed
    if methods is None and (sizes or pruning_epochs):
        budget = BUDGET_OF[next(iter(sizes))] if sizes else None
        typed = (f"--{budget} sizes " + " and ".join(m.name for m in compressors()
                                                     if m.budget == budget) if sizes
                 else "--pruning-epochs trains a width method")
        _fail(f"{typed}; give --methods too (e.g. --methods greedy,mlpruning,lowrank)")
    run_command("compare", values, home, verbose)


compare.__signature__ = compare_signature()
app.command(name="compare")(compare)


def compress(method: str, prune_layers: int, **options) -> None:
    """Compress a model with one method: in width (to a --density or a --constraint) or offline (to a --ratio, no fine-tuning).

    Takes `glp prune`'s model, data and budget options, and each method's own (generated from its parameters, glp.methods). --model is compressed as it is when it is fine-tuned for a task (a directory or models:/NAME@alias), else fine-tuned first; --prune-layers K prunes K layers greedily first. Each model is saved with its plan (glp.load_pretrained reloads it), registered in MLflow as ONNX, and written to parquet/finals/.
    """  # noqa: E501 - one line, so that --help wraps it to the terminal
    home, verbose = options.pop("home"), options.pop("verbose")
    options["register"] = options.pop("register_compress")
    sizes = budget_values(options)
    own = {name: options.pop(name) for name in method_options()}
    values = {**_params(options), "method": method, "prune_layers": prune_layers,
              "options": {k: v for k, v in own.items() if v is not None}, **sizes}
    run_command("compress", values, home, verbose)


compress.__signature__ = compress_signature()
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
    from flows.sources import check_registered, download_registered

    check_registered(spec, home, option="glp bench")
    run_home = RunHome.resolve(home)
    return download_registered(spec, run_home.tracking_uri, run_home, option="glp bench",
                               use="time")


@app.command()
def pick(
    max_latency_ms: Annotated[float | None, typer.Option(
        help="slowest latency allowed (ms per batch of --batch rows, as the run measured "
             "it)")] = None,
    min_speedup: Annotated[float | None, typer.Option(
        help="speed-up over the unpruned model in the same precision and runtime, measured "
             "beside it")] = None,
    min_metric: Annotated[float | None, typer.Option(
        help="quality floor on the dev metric (mean over seeds; an int8 deployment's own "
             "int8 score)")] = None,
    max_parameters: Annotated[int | None, typer.Option(help="most parameters allowed")]
    = None,
    precision: Annotated[list[str] | None, typer.Option(
        metavar="fp32|int8", help="only deployments in this precision (repeatable) "
                                  "[default: both]")] = None,
    batch: Annotated[int, typer.Option(metavar="1|32",
                                       help="the batch size whose latency counts")] = 32,
    task: Annotated[str | None, typer.Option(help="only this task's models")] = None,
    model: Annotated[str | None, typer.Option(help="only models of this base model")] = None,
    job: Annotated[str | None, typer.Option(help="only this job's models (its id)")] = None,
    alias: Annotated[str | None, typer.Option(help="point this registry alias (e.g. "
                                              "production) at the chosen version")] = None,
    home: HomeOption = None,
) -> None:
    """The best deployment that meets a budget, from a run home's results: a model in a
    precision (fp32 or int8) and a runtime (PyTorch or onnxruntime).

    With a speed or size limit: the best dev metric among the deployments within it; with
    only --min-metric: the fastest one that reaches it. An int8 deployment is judged by its
    int8 graph's own dev score and latency. Prints the choice, its plan and its measured
    numbers; the last line is its registry URI (models:/NAME/VERSION: the int8 version for
    int8) or, if it was not registered, its model directory. Nothing meets the budget: one
    line naming the closest, exit 1.
    """
    from glp.report.pick import FP32, INT8, Budget, NothingMeets, choose
    from glp.report.terminal import print_pick
    from tasks.picking import point_alias, read_finals

    for value in precision or ():
        if value not in (FP32, INT8):
            _fail(f"--precision {value}: expected {FP32} or {INT8}")
    run_home = RunHome.resolve(home)
    try:
        budget = Budget(max_latency_ms, min_speedup, min_metric, max_parameters)
        chosen, meeting = choose(read_finals(run_home), budget, str(run_home.root),
                                 task=task, model=model, job=job, batch=batch,
                                 precisions=precision or (FP32, INT8))
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
    """``glp``: the commands, with a bad option value refused in one line, as every other
    refusal is (``error: --max-parameters abc: …``), instead of click's usage block.
    Ends with ``SystemExit`` and the command's code."""
    sys.exit(_run())


def program() -> None:
    """The ``glp`` program (and ``python -m flows.cli``): :func:`main`, then an end without
    the interpreter's teardown once every exit handler has run
    (:func:`_end_without_teardown`). Only the program itself: a caller of :func:`main`
    keeps its own exit."""
    global _exit_code
    atexit.register(_end_without_teardown)  # the first registered runs last
    _exit_code = _run()
    sys.exit(_exit_code)


def _run() -> int:
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="glp", standalone_mode=False)
    except typer.BadParameter as exc:
        try:
            _fail(_bad_parameter(exc, sys.argv[1:]))
        except typer.Exit as stop:
            return stop.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 1
    except typer.TyperException as exc:  # unknown options, missing arguments: click's text
        exc.show()
        return exc.exit_code
    return code if isinstance(code, int) else 0


_exit_code = 1
"""The command's exit code, for :func:`_end_without_teardown` (1 until it returns)."""


def _end_without_teardown() -> None:
    """The last exit handler: flush, then leave at once. Every other handler has run by now
    (Prefect's, which send what it holds; the API server's stop), and the files glp writes
    are closed when written; what is left is the interpreter freeing the modules of torch,
    transformers, onnxruntime and MLflow, which took 1.9 s of every command here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(_exit_code)


def _bad_parameter(exc, argv: list[str]) -> str:
    """``--option VALUE: reason``, the value as it was typed."""
    options = list(getattr(exc.param, "opts", None) or [])
    option = options[0] if options else (exc.param_hint or "a value")
    value = None
    for index, word in enumerate(argv):
        for name in options:
            if word == name and index + 1 < len(argv):
                option, value = name, argv[index + 1]
            elif word.startswith(name + "="):
                option, value = name, word[len(name) + 1:]
    reason = exc.message[:1].lower() + exc.message[1:] if exc.message else "not valid"
    return f"{option} {value}: {reason}" if value is not None else f"{option}: {reason}"


if __name__ == "__main__":
    program()
