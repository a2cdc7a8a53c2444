"""The ``glp`` command line: prune, demo, ui.

Prefect reads its settings when it is first imported, so this module sets up the run
home's environment first and imports the flows only inside the commands.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shlex
import signal
import statistics
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from glp import GlpError
from glp.methods import compressors, get_method
from glp.methods import names as method_names
from tasks import progress
from tasks.home import RunHome, configure_environment

app = typer.Typer(
    name="glp",
    help="Greedy layer pruning for transformer encoders: smaller, faster models for one task.",
    no_args_is_help=True,
    rich_markup_mode=None,  # help texts are plain: "[default: sst2]" is not a markup tag
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
# soft_wrap: an error is one line in a log or a pipe, however long.
err = Console(stderr=True, soft_wrap=True)

# Options whose flow parameter is spelt differently, and the way back for error lines.
RENAMED = {"text_column": "text_columns", "lr": "learning_rate", "register": "register_models"}
OPTION_NAMES = {param: f"--{option.replace('_', '-')}" for option, param in RENAMED.items()}

# The demo: the embedded MiniLM on 2,000 SST-2 examples, 1 epoch, max length 64,
# lr 1e-4 (2e-5 often stays at the majority class with so little data), 2 of 6 layers.
DEMO = {"task": "sst2", "remove": 2, "train_limit": 2000, "epochs": 1.0, "max_length": 64,
        "learning_rate": 1e-4, "seeds": 1}


class RichReporter:
    """Progress bars: iterations, candidates and final models stay; training steps come and go."""

    def __init__(self, bars: Progress):
        self.bars = bars
        self.kinds: dict[object, str] = {}

    def begin(self, kind: str, label: str, total: int | None) -> object:
        handle = self.bars.add_task(label, total=total)
        self.kinds[handle] = kind
        return handle

    def update(self, handle: object, completed: int, total: int | None = None) -> None:
        self.bars.update(handle, completed=completed, total=total or None)

    def end(self, handle: object) -> None:
        if self.kinds.pop(handle, None) == "steps":
            self.bars.remove_task(handle)  # one bar per fine-tune would flood the screen

    def note(self, message: str) -> None:
        self.bars.console.print(f"[green]✓[/green] {message}")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(code=code)


def _quiet(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
        # The ephemeral API server logs its shutdown of in-flight event flushes as errors.
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        warnings.filterwarnings("ignore")
        logging.getLogger("alembic").setLevel(logging.ERROR)
        # Once a run is interrupted, every stopped task logs its crash: one line says it.
        for name in ("prefect.task_runs", "prefect.flow_runs"):
            logging.getLogger(name).addFilter(lambda record: not progress.stop_requested())
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


class Terminated(BaseException):
    """SIGTERM (a scheduler or ``kill`` asking the command to stop) or SIGHUP (its terminal
    closed) reached the command."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _interrupted(signum: int, run_home: RunHome) -> typer.Exit:
    name = signal.Signals(signum).name
    err.print(f"[bold red]interrupted[/bold red] by {name}: finished fine-tunes are cached in "
              f"{run_home.results}; run the same command again to resume.", highlight=False)
    return typer.Exit(code=128 + signum)


def detach_ephemeral_server() -> None:
    """Start Prefect's temporary API server in a session of its own.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group. Without
    this, the temporary server, a child process of this one, dies with it while the flow
    still needs it: glp then spent minutes printing connection errors, exited 1 and could
    leave the MLflow run RUNNING. Outside the group only glp gets the signal, stops its
    fine-tunes, closes its runs and stops the server itself (Prefect's exit handler).
    """
    from prefect.server.api import server

    run = server.SubprocessASGIServer._run_uvicorn_command
    if getattr(run, "glp_detached", False):
        return

    def detached(self):
        popen = server.subprocess.Popen
        server.subprocess.Popen = functools.partial(popen, start_new_session=True)
        try:
            return run(self)
        finally:
            server.subprocess.Popen = popen

    detached.glp_detached = True
    server.SubprocessASGIServer._run_uvicorn_command = detached


def start_services(tracking_uri: str) -> None:
    """Start Prefect's temporary API server in a thread while this one opens the MLflow
    store and imports what registration needs: on a new home both create their databases,
    and one after the other they took 12 s + 2.4 s here. Nothing is started before every
    input has been checked (a refused command writes nothing).

    A server that fails to start here is started again, and reported, by the flow itself.
    """
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    from tasks.tracking import client_for

    thread = None
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        from prefect.server.api.server import SubprocessASGIServer

        # glp's flows use no block types: registering every one of them on a new database
        # took 4 s of the temporary server's start here (15.5 s against 11.2 s).
        os.environ.setdefault("PREFECT_API_BLOCKS_REGISTER_ON_START", "false")
        server = SubprocessASGIServer()

        def start() -> None:
            try:
                server.start()
            except Exception:  # noqa: BLE001 - the flow's own start says what went wrong
                server.stop()  # not a second server beside one that never answered

        thread = threading.Thread(target=start, name="glp-prefect-server", daemon=True)
        thread.start()
    try:
        client_for(tracking_uri)  # creates a new store's tables
        import onnxruntime  # noqa: F401 - imported here, while the server starts
        import torch.onnx  # noqa: F401
    finally:
        if thread is not None:
            thread.join()


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
    """Validate, run the ``prune`` or ``compare`` flow with progress bars, print the summary.

    SIGTERM, SIGHUP (the terminal closed) and Ctrl-C stop the run within a training step:
    the running fine-tune is dropped, the parent MLflow run is closed as KILLED, the
    temporary API server is stopped, and the command exits with 128 + the signal's number
    (143, 129, 130); the same command resumes.
    """
    run_home = RunHome.resolve(home)
    # Prefect swaps in its own SIGTERM handler while the flow runs and hands the signal
    # back to this one when the flow has been torn down.
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _run_command(kind, values, run_home, verbose)
    except Terminated as stop:
        raise _interrupted(stop.signum, run_home) from None
    except KeyboardInterrupt:
        raise _interrupted(signal.SIGINT, run_home) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_command(kind: str, values: dict, run_home: RunHome, verbose: bool) -> None:
    configure_environment(run_home)
    _quiet(verbose)
    from prefect.exceptions import TerminationSignal
    from pydantic import ValidationError

    if kind == "compare":
        from flows.compare import CompareParams as Params
        from flows.compare import compare as flow
        from flows.compare import preflight
    elif kind == "compress":
        from flows.compress import CompressParams as Params
        from flows.compress import compress as flow
        from flows.compress import preflight
    else:
        from flows.prune import PruneParams as Params
        from flows.prune import preflight
        from flows.prune import prune as flow

    try:
        params = Params(**values, home=str(run_home.root))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if not isinstance(p, int))
        option = OPTION_NAMES.get(field, f"--{field.replace('_', '-')}")
        _fail(f"{option} {first.get('input')!r}: {first['msg'].lower()}")
    try:
        described = preflight(params)
        # Only now, with every input checked, is anything written.
        run_home.ensure_writable()
    except GlpError as exc:
        _fail(user_message(exc, values))
    console.print(f"[bold]glp[/bold] {described}")
    console.print(f"run home: {run_home.root}")
    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)
    progress.set_reporter(RichReporter(bars))
    detach_ephemeral_server()
    try:
        start_services(params.tracking_uri or run_home.tracking_uri)
        with bars:
            summary = flow(params)
    except GlpError as exc:
        _fail(user_message(exc, values))
    except TerminationSignal:  # Prefect kept the signal (a cancel from its runner)
        raise Terminated() from None
    except Exception as exc:  # a task failed after its retries: say so, keep what finished
        from tasks.faults import is_full_disk

        if is_full_disk(exc):  # not retried: one line, what to do
            _fail(f"no space left on the device of {exc.filename or run_home.root}: free some "
                  f"space (glp gc --home {run_home.root} removes what no run needs) and run "
                  "the same command again")
        err.print(f"[bold red]error:[/bold red] the run failed: {type(exc).__name__}: "
                  f"{escape(str(exc))}",
                  highlight=False)
        err.print(f"Finished fine-tunes are cached in {run_home.results}; run the same "
                  "command again to resume (--verbose shows the task logs).", highlight=False)
        raise typer.Exit(code=1) from None
    finally:
        progress.set_reporter(None)
    {"compare": print_comparison, "compress": print_compression}.get(kind, print_summary)(
        summary)


def print_counts(summary) -> None:
    """How many fine-tunes were computed and reused, the wall time and the job."""
    total = summary.computed + summary.reused
    what = ("compressions" if getattr(summary, "method", None) in method_names("offline")
            else "fine-tunes")
    console.print(f"{what}: [bold]{summary.computed}[/bold] computed, "
                  f"[bold]{summary.reused}[/bold] reused from cache (of {total}); "
                  f"wall time {summary.seconds:.0f} s; job {summary.job_id}")


def print_registered(summary) -> None:
    """With --register: every name the comparison registered, in the order of its rows."""
    names = list(dict.fromkeys(r["registered_model"] for r in summary.finals
                               if r.get("registered_model")))
    if names:
        console.print(f"registered:     {', '.join(names)} "
                      f"(models:/NAME@best; a layer strategy's ONNX twin is NAME-onnx)")


def print_comparison(summary) -> None:
    """The mean ± std table per strategy and depth, and where the report is."""
    import pandas as pd

    from glp.report.tables import summarize

    if "report" not in summary.report:  # --methods without a layer strategy
        print_methods(summary)
        print_counts(summary)
        print_registered(summary)
        console.print(f"every method:   {summary.report['methods']}")
        console.print(f"Pareto plots:   {summary.report['pareto_latency']}")
        console.print(f"                {summary.report['pareto_parameters']}")
        return
    layers = [r for r in summary.finals if r.get("method") in ("layers", "unpruned")]
    table = summarize(pd.DataFrame(layers), summary.num_layers)
    shown = Table(title=f"dev {summary.metric}: mean ± std over seeds, by layers removed")
    counts = sorted(table["removed_layers"].unique())
    shown.add_column("strategy")
    for count in counts:
        shown.add_column(str(count), justify="right")
    for name in dict.fromkeys(table["label"]):
        cells = []
        for count in counts:
            match = table[(table["label"] == name) & (table["removed_layers"] == count)]
            cells.append("" if match.empty else
                         f"{match['mean'].iloc[0]:.4f} ± {match['std'].iloc[0]:.4f}")
        shown.add_row(name, *cells)
    console.print(shown)
    if "methods" in summary.report:
        print_methods(summary)
    print_counts(summary)
    print_registered(summary)
    console.print(f"report:         {summary.report['report']}")
    if "methods" in summary.report:
        console.print(f"every method:   {summary.report['methods']}")
        console.print(f"Pareto plots:   {summary.report['pareto_latency']}")
        console.print(f"                {summary.report['pareto_parameters']}")
    console.print(f"plots:          {summary.report['metric_vs_removed']}")
    console.print(f"                {summary.report['metric_vs_latency']}")
    console.print(f"Parquet tables: {Path(summary.home) / 'parquet'} (finals/ has a strategy "
                  "column)")


def print_methods(summary) -> None:
    """Every method's models, fastest first, and the best of each speed-up bucket."""
    from glp.report.pareto import buckets, method_of, size_of, table
    from glp.report.pick import models

    found = models(summary.finals)
    shown = Table(title=f"Every method: dev {summary.metric}, CPU latency (ms) and speed-up "
                        "over the unpruned model")
    for column in ("method", "size", f"dev {summary.metric}", "torch b1", "torch b32",
                   "int8 b1", "int8 b32", "speed-up", "int8 b1 speed-up"):
        shown.add_column(column, justify="left" if column in ("method", "size") else "right")
    for row in table(found, summary.metric):
        shown.add_row(*row[:3], row[7], row[8], row[11], row[12], row[13], row[14])
    console.print(shown)
    for bucket in buckets(found):
        best = bucket["best"]
        console.print(f"  ≥{bucket['threshold']:g}×: " + (
            f"{method_of(best)} ({size_of(best)}), {summary.metric} {best.mean:.4f} ± "
            f"{best.std:.4f}, {bucket['speedup']:.2f}×" if best else "no model that fast"))


def print_compression(summary) -> None:
    """Per density: the encoder density reached, parameters, dev score over seeds, latency
    and the registered ONNX version; then where to look."""
    table = Table(title=f"{summary.method}: dev {summary.metric} (mean ± std over seeds)")
    for column in ("model", "encoder density", "parameters", "stored MB", "layers", "seeds",
                   f"dev {summary.metric}", "latency ms", "registry"):
        table.add_column(column, justify="left" if column in ("model", "registry") else "right")
    groups: dict[str, list[dict]] = {}
    for row in summary.finals:
        groups.setdefault(row["variant"] or row["strategy"], []).append(row)
    inverse = {v: k for k, v in summary.versions.items() if k != "best"}
    for label, rows in groups.items():
        values = [r["value"] for r in rows if not r.get("diverged")]
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        score = f"{statistics.mean(values):.4f}{spread}" if values else ""
        if len(values) < len(rows):
            score += f"{' ' if score else ''}[red]{len(rows) - len(values)} of {len(rows)} " \
                     "diverged[/red]"
        first = rows[0]
        version = first.get("model_version")
        registry = f"v{version} @{inverse.get(version, '')}" if version else ""
        if version and version == summary.versions.get("best"):
            registry += " @best"
        latency, stored = first.get("latency_ms"), first.get("stored_bytes")
        table.add_row(label, f"{first['encoder_density']:.3f}", f"{first['parameters']:,}",
                      f"{stored / 1e6:.1f}" if stored else "", str(first["depth"]),
                      str(len(rows)), score, f"{latency:.1f}" if latency else "", registry)
    console.print(table)
    print_counts(summary)
    home = Path(summary.home)
    dirs = [r["model_dir"] for r in summary.finals if r["method"] not in ("unpruned", "input")
            and r.get("model_dir")]
    if dirs:
        console.print(f"a model:        glp.load_pretrained(\"{dirs[0]}\")")
        console.print(f"                glp export {dirs[0]} --onnx --out model.onnx")
    if summary.registered_model:
        console.print(f"registered ONNX: [cyan]{summary.registered_model}[/cyan] "
                      f"(mlflow.pyfunc.load_model(\"models:/{summary.registered_model}@best\"))")
    console.print(f"MLflow UI:      glp ui --home {home}")
    console.print(f"Parquet tables: {home / 'parquet'} (finals/: method, plan, parameters, "
                  "encoder_density, model_dir)")


def _score_cell(row: dict) -> str:
    """A score, or "diverged" for a fine-tune whose loss or metric was not finite."""
    if row.get("diverged") or row["value"] != row["value"]:
        return "diverged"
    budget = row.get("budget", 1.0)
    return f"{row['value']:.4f}" + (f"@{budget:g}" if budget < 1 else "")


def print_summary(summary) -> None:
    """The pruning order, every candidate's score, the final models, and where to look."""
    console.print()
    console.print(f"[bold]Pruning order[/bold] ({summary.strategy}, first removed first): "
                  f"[cyan]{', '.join(map(str, summary.order))}[/cyan]")
    if summary.candidates and summary.strategy.startswith("greedy"):
        full = sum(summary.num_layers - k for k in range(len(summary.order)))
        console.print(f"search cost: {summary.search_fine_tunes} fine-tunes, "
                      f"{summary.search_equivalents:g} whole-budget equivalents "
                      f"({summary.search_equivalents / full:.0%} of the full search's {full})")
        shares = any(row.get("budget", 1.0) < 1 for row in summary.candidates)
        table = Table(title=f"Candidates: selection-split {summary.metric} "
                            "(* = removed in that iteration"
                            + ("; @share: the last share of the budget it was trained for)"
                               if shares else ")"))
        table.add_column("iteration", justify="right")
        for layer in range(summary.num_layers):
            table.add_column(f"-L{layer}", justify="right")
        iterations = sorted({row["iteration"] for row in summary.candidates})
        for it in iterations:
            rows = {r["layer"]: r for r in summary.candidates if r["iteration"] == it}
            cells = []
            for layer in range(summary.num_layers):
                if layer not in rows:
                    cells.append("")
                    continue
                mark = "*" if summary.order[it] == layer else ""
                cells.append(_score_cell(rows[layer]) + mark)
            table.add_row(str(it + 1), *cells)
        console.print(table)
    distilled = any(r.get("distilled") for r in summary.finals)
    finals = Table(title=f"Final models: dev {summary.metric}"
                   + (" (kd: distilled from the unpruned model)" if distilled else ""))
    columns = ("layers", "removed", *(("fine-tune",) if distilled else ()), "seeds",
               f"dev {summary.metric}", "parameters", "registry")
    for column in columns:
        finals.add_column(column, justify="right" if column != "registry" else "left")
    groups = sorted({(r["depth"], bool(r.get("distilled"))) for r in summary.finals},
                    key=lambda g: (-g[0], g[1]))
    inverse = {v: k for k, v in summary.versions.items() if k.startswith("depth-")}
    best = summary.versions.get("best")
    for depth, kd in groups:
        rows = [r for r in summary.finals
                if r["depth"] == depth and bool(r.get("distilled")) == kd]
        values = [r["value"] for r in rows if not r.get("diverged")]
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        score = f"{statistics.mean(values):.4f}{spread}" if values else ""
        if len(values) < len(rows):  # said in words, never shown as a score of 0.0
            score += f"{' ' if score else ''}[red]{len(rows) - len(values)} of {len(rows)} " \
                     "diverged[/red]"
        version = next((r["model_version"] for r in rows if r.get("model_version")), None)
        registry = ""
        if version and kd:
            registry = f"v{version} of -kd"
        elif version:
            registry = f"v{version} @{inverse.get(version, '')}"
            registry += " @best" if version == best else ""
        finals.add_row(str(depth), ",".join(map(str, rows[0]["removed"])) or "none (reference)",
                       *(("kd" if kd else "plain",) if distilled else ()),
                       str(len(rows)), score,
                       f"{rows[0]['parameters']:,}" if rows[0]["parameters"] else "",
                       registry)
    console.print(finals)
    print_counts(summary)
    home = Path(summary.home)
    if summary.registered_model:
        console.print(f"registered model: [cyan]{summary.registered_model}[/cyan] "
                      f"(load with mlflow.transformers.load_model("
                      f"\"models:/{summary.registered_model}@best\"))")
        console.print(f"                  and as ONNX: [cyan]{summary.registered_model}-onnx"
                      "[/cyan] (mlflow.pyfunc, onnxruntime only)")
        if distilled:
            console.print(f"distilled:        [cyan]{summary.registered_model}-kd[/cyan] "
                          "(and -kd-onnx), aliases depth-N and best")
    console.print(f"MLflow UI:      glp ui --home {home}")
    console.print(f"Parquet tables: {home / 'parquet'} (candidates/, selections/, finals/)")


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
    import os
    import tempfile

    import torch

    from glp.deploy.bench import bench as run_bench

    batch_size, length = batch_size or [1, 32], length or [32, 128]
    for name, values, low in (("--batch-size", batch_size, 1), ("--length", length, 1),
                              ("--repeats", [repeats], 1), ("--threads", [threads or 1], 1)):
        bad = [v for v in values if v < low]
        if bad:
            _fail(f"{name} {bad[0]}: choose a whole number >= {low}")
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            timed, vocab = _bench_models(models, threads, onnx, Path(tmp), home)
            shapes = [(b, n) for b in batch_size for n in length]
            rows = run_bench(timed, shapes, vocab, repeats=repeats)
    except GlpError as exc:
        _fail(user_message(exc, {}))
    import onnxruntime

    console.print(f"threads {threads}, torch {torch.__version__}, onnxruntime "
                  f"{onnxruntime.__version__}, {repeats} interleaved rounds, synthetic "
                  "batches (no padding)", highlight=False, soft_wrap=True)
    width = max(len(r["model"]) for r in rows)
    for row in rows:
        console.print(f"{row['model']:<{width}}  batch {row['batch_size']:>3}  length "
                      f"{row['length']:>4}  median {row['median_ms']:8.2f} ms  p90 "
                      f"{row['p90_ms']:8.2f} ms", highlight=False, markup=False,
                      soft_wrap=True)
    if out:
        Path(out).write_text(json.dumps({"threads": threads, "torch": torch.__version__,
                                         "onnxruntime": onnxruntime.__version__,
                                         "rows": rows}, indent=1) + "\n")


def _bench_models(specs: list[str], threads: int, onnx: bool, tmp: Path, home):
    """name -> model to time (PyTorch, and ONNX fp32/int8 graphs exported to ``tmp``), and
    the smallest vocabulary among them (every batch must fit every model)."""
    import glp
    from glp.deploy.export import OnnxModel, export_onnx

    timed, vocab = {}, None
    for index, spec in enumerate(specs):
        path = spec
        if spec.startswith("models:/"):
            from flows.sources import download_registered

            run_home = RunHome.resolve(home)
            path = download_registered(spec, run_home.tracking_uri, run_home, option="glp bench",
                                       use="time")
        elif not (Path(spec) / "config.json").is_file():
            raise GlpError(f"{spec}: not a model directory (no config.json); give a "
                           "directory saved by glp or models:/NAME@alias")
        name = spec if len(spec) <= 60 else "…" + spec[-59:]
        model = glp.load_pretrained(path)
        size = model.get_input_embeddings().num_embeddings
        vocab = size if vocab is None else min(vocab, size)
        timed[f"{name} | torch"] = model
        if onnx:
            fp32 = export_onnx(path, tmp / f"{index}.onnx")
            int8 = export_onnx(path, tmp / f"{index}.int8.onnx", int8=True)
            timed[f"{name} | onnx"] = OnnxModel(fp32, threads=threads, spin=False)
            timed[f"{name} | onnx int8"] = OnnxModel(int8, threads=threads, spin=False)
    return timed, vocab


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

    from glp.report.pick import Budget, closest, models, plan_summary
    from glp.report.pick import pick as choose

    run_home = RunHome.resolve(home)
    try:
        budget = Budget(max_latency_ms, min_speedup, min_metric, max_parameters)
    except GlpError as exc:
        _fail(user_message(exc, {}))
    finals = run_home.parquet / "finals"
    if not finals.is_dir():
        _fail(f"--home {run_home.root}: no final models there (no parquet/finals); run glp "
              "prune, compare or compress first")
    import pyarrow.dataset as ds

    from tasks.records import FINALS

    # The current schema: a home written by an older glp lacks its newer columns (null).
    rows = ds.dataset(finals, schema=FINALS).to_table().to_pylist()
    for option, column, value in (("--task", "task", task), ("--model", "model", model),
                                  ("--job", "job_id", job)):
        if value is None:
            continue
        known = sorted({str(r[column]) for r in rows})
        rows = [r for r in rows if str(r[column]).lower() == value.lower()]
        if not rows:
            _fail(f"{option} {value}: no final models of it in {run_home.root}; found: "
                  f"{', '.join(known)}")
    subjects = sorted({(r["model"], r["task"]) for r in rows})
    if len(subjects) > 1:
        _fail(f"{run_home.root} holds models of {len(subjects)} model/task pairs ("
              + ", ".join(f"{m} on {t}" for m, t in subjects)
              + "); choose one with --model and --task")
    found = models(rows)
    if not found:
        _fail(f"every final model in {run_home.root} diverged; nothing can be picked")
    chosen, meeting = choose(found, budget)
    if budget.needs_latency and not any(m.latency_ms for m in found):
        _fail("no final model in this home has a measured latency (glp compare and glp "
              "compress measure it; glp bench DIR times any model); use --max-parameters "
              "or --min-metric")
    if chosen is None:
        near = closest(found, budget)
        where = f"; the closest: {_pick_line(near)}" if near else ""
        _fail(f"no model meets {budget.describe()} ({len(found)} models searched){where}",
              code=1)
    table = Table(title=f"Models that meet {budget.describe()} (best first)")
    for column in ("model", f"dev {chosen.metric}", "parameters", "latency ms",
                   "speed-up", "registered"):
        table.add_column(column, justify="left" if column in ("model", "registered")
                         else "right")
    for m in meeting[:10]:
        table.add_row(m.label, f"{m.mean:.4f} ± {m.std:.4f} ({m.seeds})",
                      f"{m.parameters:,}" if m.parameters else "",
                      f"{m.latency_ms:.2f}" if m.latency_ms else "",
                      f"{m.speedup:.2f}x" if m.speedup else "",
                      f"{m.registered_model} v{m.model_version}" if m.model_version else "")
    console.print(table, markup=False)
    console.print(f"picked: {_pick_line(chosen)}", markup=False, highlight=False,
                  soft_wrap=True)
    console.print(f"plan: {plan_summary(chosen.plan)}", markup=False, highlight=False,
                  soft_wrap=True)
    if alias:
        if not chosen.model_version:
            _fail(f"--alias {alias}: the chosen model was not registered (its job ran with "
                  "--no-register); register it, or load it from its directory")
        from tasks.tracking import client_for

        client_for(run_home.tracking_uri).set_registered_model_alias(
            chosen.registered_model, alias, chosen.model_version)
        console.print(f"alias @{alias} of {chosen.registered_model} now points at version "
                      f"{chosen.model_version}", markup=False, highlight=False)
    print(chosen.uri)


def _pick_line(m) -> str:
    latency = (f", {m.latency_ms:.2f} ms at batch {m.latency_batch}" if m.latency_ms else "")
    speedup = f" ({m.speedup:.2f}x)" if m.speedup else ""
    params = f", {m.parameters:,} parameters" if m.parameters else ""
    return (f"{m.label} (job {m.job_id[:12]}): dev {m.metric} {m.mean:.4f} ± {m.std:.4f} over "
            f"{m.seeds} seed(s){params}{latency}{speedup}; seed {m.chosen_seed}")


@app.command()
def demo(home: HomeOption = None, verbose: Verbose = False) -> None:
    """Greedy pruning of the embedded MiniLM on SST-2, sized for a laptop CPU (~10 minutes).

    2,000 training examples, 1 epoch, max length 64, lr 1e-4, 2 of 6 layers, 1 seed.
    """
    run_command("prune", dict(DEMO), home, verbose)


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
    from tasks.home import collect_garbage, folder_size

    run_home = RunHome.resolve(home)
    if not run_home.root.is_dir():
        _fail(f"--home {run_home.root}: no such folder (nothing to clean)")
    if not (run_home.artifacts.is_dir() or run_home.mlflow_db.exists()):
        _fail(f"--home {run_home.root}: not a glp run home (no artifacts/ or mlflow.db)")
    before = folder_size(run_home.root)
    found = collect_garbage(run_home, finals=finals, dry_run=dry_run)
    for path, size in found:
        console.print(f"{'would remove' if dry_run else 'removed'} {path} ({size / 1e6:,.1f} MB)")
    freed = sum(size for _, size in found)
    after = before - freed
    console.print(f"{'would free' if dry_run else 'freed'} {freed / 1e6:,.1f} MB; the home "
                  f"{'would hold' if dry_run else 'holds'} {after / 1e6:,.1f} MB")


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
