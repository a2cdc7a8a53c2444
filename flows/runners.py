"""Where a flow's submitted tasks run: a task-runner spec string and the flow dispatch.

The candidates of one greedy iteration (and the final models) are submitted together, so
a parallel task runner fine-tunes them at the same time. A spec is one short string, the
same on the command line (``--task-runner``), in a deployment's parameters
(``params.task_runner``) and in Python:

``sequential``               one task at a time in the flow's process (the default: on a
                             small machine one fine-tune already uses every core)
``threads:N``                N threads in the flow's process
``dask``, ``dask:N``         a temporary local Dask cluster of N worker processes (default
                             2), one task per worker, the CPU cores split between workers
``dask:tcp://HOST:PORT``     an existing Dask cluster (its scheduler's address)
``ray``                      a temporary local Ray instance
``ray:ray://HOST:PORT``      an existing Ray cluster (needs ``pip install prefect-ray``)

A flow's task runner is fixed when the flow object is made, so the flows dispatch: with
``sequential`` the public flow does the work itself; otherwise it runs the same body as
a subflow made with that task runner (``run_on_task_runner``). Prefect-dask and
prefect-ray are imported only when asked for.

Workers must reach the same Prefect API, run home (checkpoints and cached results) and
MLflow tracking store as the flow. For a local cluster, the flow's own API URL is passed
to the worker processes, so they report to the flow's (possibly ephemeral) API instead of
each starting a temporary server of its own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from glp import GlpError

SEQUENTIAL = "sequential"
DEFAULT_DASK_WORKERS = 2
FORMS = ("sequential, threads:N, dask, dask:N, dask:tcp://HOST:PORT, ray, "
         "ray:ray://HOST:PORT")
_DASK_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss)://\S+$")
_RAY_ADDRESS = re.compile(r"^(ray|http|https)://\S+$")

R = TypeVar("R")


@dataclass(frozen=True)
class RunnerSpec:
    """A parsed task-runner spec: ``kind`` with a worker count or a cluster address."""

    kind: str  # sequential | threads | dask | ray
    workers: int | None = None  # threads:N, dask:N (a local cluster)
    address: str | None = None  # an existing Dask or Ray cluster

    @property
    def spec(self) -> str:
        """The normalised spec string (``dask`` becomes ``dask:2``)."""
        if self.kind == SEQUENTIAL:
            return SEQUENTIAL
        if self.kind == "ray" and not self.address:
            return "ray"
        return f"{self.kind}:{self.address or self.workers}"

    @property
    def local(self) -> bool:
        """Whether the runner starts its workers itself, on this machine."""
        return self.address is None


def _bad(spec: object, why: str = "") -> GlpError:
    reason = f" ({why})" if why else ""
    return GlpError(f"unknown task runner {spec!r}{reason}; use one of: {FORMS}")


def _count(spec: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise _bad(spec, "N must be a whole number of at least 1")
    return int(value)


def parse_task_runner(spec: str | None) -> RunnerSpec:
    """Check a spec string; a GlpError (one line, listing the valid forms) if it is bad."""
    if spec is None:
        return RunnerSpec(SEQUENTIAL)
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(spec)
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == SEQUENTIAL and not rest:
        return RunnerSpec(SEQUENTIAL)
    if kind == "threads" and rest:
        return RunnerSpec("threads", workers=_count(text, rest))
    if kind == "dask":
        if not rest:
            return RunnerSpec("dask", workers=DEFAULT_DASK_WORKERS)
        if rest.isdigit():
            return RunnerSpec("dask", workers=_count(text, rest))
        if _DASK_ADDRESS.match(rest):
            return RunnerSpec("dask", address=rest)
        raise _bad(text, "a Dask address looks like tcp://HOST:8786")
    if kind == "ray":
        if not rest:
            return RunnerSpec("ray")
        if _RAY_ADDRESS.match(rest) or rest == "auto":
            return RunnerSpec("ray", address=rest)
        raise _bad(text, "a Ray address looks like ray://HOST:10001")
    raise _bad(text)


def make_task_runner(spec: str = SEQUENTIAL):
    """A Prefect task runner for a spec string (see the module docstring for the forms).

    Raises GlpError for a bad spec, or when the runner's package is not installed.
    Called inside a flow run (as the flows do), a local Dask or Ray cluster's workers are
    pointed at the flow's Prefect API.
    """
    parsed = parse_task_runner(spec)
    if parsed.kind in (SEQUENTIAL, "threads"):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=parsed.workers or 1)
    if parsed.kind == "dask":
        runner_class = _import("prefect_dask", "DaskTaskRunner", "prefect-dask", parsed)
        if parsed.address:
            return runner_class(address=parsed.address)
        return runner_class(cluster_kwargs={
            "n_workers": parsed.workers, "threads_per_worker": 1, "processes": True,
            "env": local_worker_env(parsed.workers),
        })
    _import("prefect_ray", "RayTaskRunner", "prefect-ray", parsed)
    runner_class = _ray_task_runner_class()
    if parsed.address:
        return runner_class(address=parsed.address)
    env = {k: v for k, v in local_worker_env(None).items() if k == "PREFECT_API_URL"}
    return runner_class(init_kwargs={"runtime_env": {"env_vars": env}} if env else None)


def _import(module: str, name: str, package: str, parsed: RunnerSpec):
    try:
        imported = __import__(module, fromlist=[name])
    except ImportError as exc:
        raise GlpError(f"the task runner '{parsed.spec}' needs {package}, which is not "
                       f"installed: pip install {package}") from exc
    return getattr(imported, name)


# SIGTERM on a Ray run. ``ray.init`` puts its own SIGTERM handler in place of this process's,
# in Python and in Ray's C++ core, whose handler aborts the process (seen here with Ray
# 2.60: on SIGTERM the CLI printed "*** SIGTERM received" and died of SIGABRT, at once or
# a minute later, never with its own message and exit code 143). Giving the old handler
# back is not enough: a wait on a Ray future (``ray.get``) stops only for a
# KeyboardInterrupt: any other handler's exception (Prefect's TerminationSignal, the CLI's
# Terminated) waits with it until the awaited fine-tune ends, then is lost or comes out
# as a SystemError (both seen).
# So while a Ray runner of ours is entered, SIGTERM in such a wait raises a
# KeyboardInterrupt, and the wait hands the signal to the old handler once out of Ray.
_ray_waits = 0  # how many waits on Ray the main thread is in
_sigterm_in_wait: tuple[int, Any] | None = None  # (signal, old handler), set in a wait


def _pass_on(handler: Any, signum: int, frame: Any) -> None:
    """What ``handler`` (a handler ``signal.getsignal`` returned) does with the signal."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _on_sigterm(previous: Any, signum: int, frame: Any) -> None:
    global _sigterm_in_wait
    if previous == signal.SIG_IGN:
        return
    if _ray_waits:
        _sigterm_in_wait = (signum, previous)
        raise KeyboardInterrupt  # the one exception that stops ray.get
    _pass_on(previous, signum, frame)


@contextlib.contextmanager
def _stoppable_ray_wait():
    """A wait on Ray in which SIGTERM acts (see above); other threads get no signals."""
    global _ray_waits, _sigterm_in_wait
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _ray_waits += 1
    try:
        yield
    except KeyboardInterrupt:
        caught, _sigterm_in_wait = _sigterm_in_wait, None
        if caught is None:  # Ctrl-C
            raise
        signum, previous = caught
        _pass_on(previous, signum, None)  # raises the old handler's exception
        raise
    finally:
        _ray_waits -= 1


@functools.cache
def _ray_task_runner_class():
    """prefect-ray's RayTaskRunner, with SIGTERM stopping a run (exit 143, resumable) as on
    every other runner, and the Ray instance it started shut down on the way out."""
    import ray
    from prefect_ray.task_runners import PrefectRayFuture, RayTaskRunner

    class StoppableRayFuture(PrefectRayFuture):
        def wait(self, timeout=None):
            with _stoppable_ray_wait():
                return super().wait(timeout)

        def result(self, timeout=None, raise_on_failure=True):
            with _stoppable_ray_wait():
                return super().result(timeout, raise_on_failure)

    class StoppableRayTaskRunner(RayTaskRunner):
        future_class = StoppableRayFuture

        def __enter__(self):
            main = threading.current_thread() is threading.main_thread()
            self._glp_sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                return super().__enter__()
            finally:
                previous = self._glp_sigterm
                if previous is not None:  # None: not the main thread, or not set from Python
                    driver = ray.is_initialized() and \
                        ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE
                    # In a Ray worker (which enters the flow's runner too), leave it.
                    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, previous)
                                  if driver else previous)

        def __exit__(self, *exc_info):
            try:
                super().__exit__(*exc_info)
            finally:
                if self._glp_sigterm is not None:
                    signal.signal(signal.SIGTERM, self._glp_sigterm)

        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            return self.future_class(task_run_id=future.task_run_id,
                                     wrapped_future=future.wrapped_future)

    return StoppableRayTaskRunner


def flow_api_url() -> str | None:
    """The Prefect API URL of the running flow (an ephemeral server's too), if reachable.

    None outside a flow run, or for an in-process API that other processes cannot reach.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    client = getattr(context, "client", None)
    url = str(getattr(client, "api_url", "") or "").rstrip("/")
    return url if url.startswith(("http://", "https://")) and "ephemeral-prefect" not in url \
        else None


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_worker_env(workers: int | None) -> dict[str, str]:
    """Environment for the worker processes of a local cluster.

    ``PREFECT_API_URL``: the flow's API. With Prefect's default ephemeral API, a worker
    process would otherwise start a temporary API server of its own (seen here: one per
    worker process, each on its own port, all writing to the same database). ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS``: the machine's cores split between the workers (torch reads them
    when it starts in the worker; Dask's own default is 1 thread per worker process).
    """
    env: dict[str, str] = {}
    url = flow_api_url()
    if url:
        env["PREFECT_API_URL"] = url
    if workers:
        threads = str(max(1, cpu_cores() // workers))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def run_on_task_runner(body: Callable[[Any], R], params: Any, name: str) -> R:
    """``body(params)`` on the task runner that ``params.task_runner`` names.

    Call this from inside a flow whose own task runner is the sequential one. With
    ``sequential`` (or no ``task_runner`` field) the body runs right here, in the calling
    flow run. Otherwise it runs as a subflow named ``<name>-<kind>`` whose task runner is
    made from the spec; the subflow's tasks report to the same flow-run tree.
    """
    from prefect import flow

    parsed = parse_task_runner(getattr(params, "task_runner", SEQUENTIAL))
    if parsed.kind == SEQUENTIAL:
        return body(params)
    subflow = flow(body, name=f"{name}-{parsed.kind}", task_runner=make_task_runner(parsed.spec),
                   log_prints=True)
    streams = sys.stdout, sys.stderr
    try:
        return subflow(params)
    finally:
        # Two tasks tokenising at once in one process (threads:N) can leave sys.stdout
        # swapped for a StringIO: dill, which datasets uses to fingerprint the map
        # function, swaps it without a lock to read dis.dis output. Seen here; put it back.
        sys.stdout, sys.stderr = streams
