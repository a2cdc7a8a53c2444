"""Running one flow as a command: inputs checked first, then the flow with progress bars on
its own Prefect API server, Ctrl-C and SIGTERM, one-line errors, and the result printed.

Prefect reads its settings when it is first imported, so this module (like the CLI) imports
Prefect and the flows only inside its functions, after the run home's environment is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from typing import NoReturn

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

from glp import GlpError
from tasks import progress
from tasks.faults import FULL_DISK_TEXTS
from tasks.home import RunHome, configure_environment

console = Console()
# soft_wrap: an error is one line in a log or a pipe, however long.
err = Console(stderr=True, soft_wrap=True)


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
        self.bars.console.print(f"[green]✓[/green] {escape(message)}")


class LineReporter:
    """For a log file or a pipe, where live bars show nothing until the end: a timestamped
    line as each fine-tune starts, each time a set of candidates, final models or int8
    scores advances, and for each note."""

    def __init__(self, out: Console):
        self.out = out
        self.open: dict[int, tuple[str, str, int | None, int]] = {}
        self.count = 0

    def _line(self, text: str) -> None:
        self.out.print(f"{time.strftime('%H:%M:%S')} {text}", markup=False, highlight=False,
                       soft_wrap=True)

    def begin(self, kind: str, label: str, total: int | None) -> object:
        self.count += 1
        label = label.strip()
        self.open[self.count] = (kind, label, total, 0)
        self._line(f"{label}: started" if kind == "steps" else f"{label}: 0/{total}")
        return self.count

    def update(self, handle: object, completed: int, total: int | None = None) -> None:
        kind, label, known, last = self.open.get(handle, ("steps", "", None, 0))
        if kind == "steps" or completed == last:
            return
        self.open[handle] = (kind, label, total or known, completed)
        self._line(f"{label}: {completed}/{total or known}")

    def end(self, handle: object) -> None:
        self.open.pop(handle, None)

    def note(self, message: str) -> None:
        self._line(f"done: {message}")


def fail(message: str, code: int = 2) -> NoReturn:
    """One red line on stderr and the exit code (2: a mistake in the input)."""
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(code=code)


QUIET_FAILURES = (*FULL_DISK_TEXTS, "no space left on the device",
                  "did not reach a 'COMPLETED' state")
"""Task-run log lines left out without --verbose."""


def quiet(verbose: bool) -> None:
    """Without --verbose: only warnings from Prefect, MLflow and Hugging Face, no bars."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "false")
        # The API server logs its shutdown of in-flight event flushes as errors.
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
            # A full disk ends the run with glp's own line (what is free, what to do), and
            # a task whose input failed says nothing the failed task has not.
            logging.getLogger(name).addFilter(lambda record: not any(
                text in record.getMessage() for text in QUIET_FAILURES))
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _hold_stop_signals() -> None:
    """After the first stop signal, the rest are ignored while glp closes its runs and
    stops its server: ``timeout`` forwards the terminal's Ctrl-C a second time, and a
    second KeyboardInterrupt in the middle of that cleanup left the MLflow run RUNNING."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _terminated(signum: int, frame: object) -> None:
    _hold_stop_signals()
    raise Terminated(signum)


def _interrupt(signum: int, frame: object) -> None:
    _hold_stop_signals()
    raise KeyboardInterrupt


def _interrupted(signum: int, run_home: RunHome) -> typer.Exit:
    name = signal.Signals(signum).name
    err.print(f"[bold red]interrupted[/bold red] by {name}: finished fine-tunes are cached in "
              f"{run_home.results}; run the same command again to resume.", highlight=False)
    return typer.Exit(code=128 + signum)


def start_services(tracking_uri: str, model: str | None) -> str | None:
    """Start the flow runs' own Prefect API server (:func:`flows.run_server.start_run_server`)
    while this process opens the MLflow store and imports what the first fine-tune, the
    int8 scores and registration need (the server took 3.9 s of a tiny job's start, the
    model's code 1.8 s of its first fine-tune, onnx 0.4 s of its first int8 score, one
    after the other; MLflow, SciPy and scikit-learn, 1.3 s, are not imported by the flows'
    modules, so that the inputs are checked without them). Nothing is started before every
    input has been checked (a refused command writes nothing).

    Returns the server's API URL; None when ``PREFECT_API_URL`` names a server (or
    Prefect's ephemeral mode is off, and Prefect says what is missing). Raises GlpError
    when the server does not answer within ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    from flows.run_server import run_server_ready, start_run_server
    from tasks.tracking import client_for

    own = not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value()
    if own:
        start_run_server()
    client_for(tracking_uri)  # creates a new store's tables
    # Imported here, while the server starts.
    import onnx  # noqa: F401
    import onnxruntime.quantization  # noqa: F401
    import scipy.stats  # noqa: F401  (the metrics)
    import sklearn.metrics  # noqa: F401
    import torch.onnx  # noqa: F401

    from glp.core.models import import_model_code

    import_model_code(model)

    if not own:
        return None
    return run_server_ready(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())


def run_command(kind: str, values: dict, home: str | None, verbose: bool, *,
                option_names: Mapping[str, str],
                explain: Callable[[GlpError, dict], str]) -> None:
    """Validate, run the ``prune``, ``compare`` or ``compress`` flow with progress bars,
    print its result.

    ``option_names`` names the option of a flow parameter spelt differently, and
    ``explain`` words a GlpError as the user typed the command (both from the CLI).

    SIGTERM, SIGHUP (the terminal closed) and Ctrl-C stop the run within a training step:
    the running fine-tune is dropped, the parent MLflow run is closed as KILLED, the API
    server is stopped, and the command exits with 128 + the signal's number (143, 129,
    130); the same command resumes. Once one of them has arrived, the others are ignored
    until the command has exited, so that a second one (``timeout`` forwards Ctrl-C) cannot
    cut that cleanup short.
    """
    run_home = RunHome.resolve(home)
    # Prefect swaps in its own SIGTERM handler while the flow runs and hands the signal
    # back to this one when the flow has been torn down.
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    stopped = False
    try:
        _run_command(kind, values, run_home, verbose, option_names, explain)
    except Terminated as stop:
        stopped = True
        raise _interrupted(stop.signum, run_home) from None
    except KeyboardInterrupt:
        stopped = True
        _hold_stop_signals()
        raise _interrupted(signal.SIGINT, run_home) from None
    finally:
        if not stopped:  # a stopped command keeps holding them until it has exited
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _run_command(kind: str, values: dict, run_home: RunHome, verbose: bool,
                 option_names: Mapping[str, str],
                 explain: Callable[[GlpError, dict], str]) -> None:
    configure_environment(run_home)
    quiet(verbose)
    from prefect.exceptions import TerminationSignal
    from pydantic import ValidationError

    from flows.run_server import run_server_settings
    from glp.report.terminal import print_comparison, print_compression, print_summary

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
        option = option_names.get(field, f"--{field.replace('_', '-')}")
        fail(f"{option} {first.get('input')!r}: {first['msg'].lower()}")
    try:
        described = preflight(params)
        # Only now, with every input checked, is anything written.
        run_home.ensure_writable()
    except GlpError as exc:
        fail(explain(exc, values))
    console.print(f"[bold]glp[/bold] {escape(described)}")
    console.print(f"run home: {run_home.root}", markup=False)
    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)
    progress.set_reporter(RichReporter(bars) if console.is_terminal else LineReporter(console))
    try:
        api = start_services(params.tracking_uri or run_home.tracking_uri, params.model)
        # The flow runs report to that server: the supported setting PREFECT_API_URL,
        # for this command only (flows.run_server says why).
        settings = run_server_settings(api) if api else contextlib.nullcontext()
        with bars, settings:
            summary = flow(params)
    except GlpError as exc:
        fail(explain(exc, values))
    except TerminationSignal:  # Prefect kept the signal (a cancel from its runner)
        raise Terminated() from None
    except Exception as exc:  # a task failed after its retries: say so, keep what finished
        from tasks.faults import full_disk_message, is_full_disk

        if is_full_disk(exc):  # not retried: one line, what to do
            fail(full_disk_message(run_home.root, params.model))
        err.print(f"[bold red]error:[/bold red] the run failed: {type(exc).__name__}: "
                  f"{escape(str(exc))}",
                  highlight=False)
        err.print(f"Finished fine-tunes are cached in {run_home.results}; run the same "
                  "command again to resume (--verbose shows the task logs).", highlight=False)
        raise typer.Exit(code=1) from None
    finally:
        progress.set_reporter(None)
    {"compare": print_comparison, "compress": print_compression}.get(kind, print_summary)(
        console, summary)
