"""Scheduled runs on one machine: a local Prefect server, glp's deployments and a worker.

:func:`serve` starts ``prefect server start`` on a loopback address with Prefect's home
under the run home, creates the process work pool, deploys ``prefect.yaml`` and runs a
worker until Ctrl-C; then it stops the worker and the server, and whatever they started.
The helpers (a free port, the environment, start, wait until healthy, stop a process
tree) are also what the deployment test uses, and what :mod:`flows.run_server` starts
a ``glp prune``/``compare``/``compress`` command's own API server with.

Every Prefect command runs in a subprocess whose settings come from its environment
(``PREFECT_API_URL``, ``PREFECT_HOME``); this process talks to a server only through
Prefect's own client made for that server's URL (:func:`prefect_client`), so nothing
depends on the settings the calling process has already loaded. Prefect is imported
inside the functions: the CLI sets up Prefect's environment before its first import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.processes import start_process, stop_process
from glp import GlpError
from tasks.home import RunHome

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO_ROOT / "prefect.yaml"
DEFAULT_POOL = "glp-process"  # the work pool that prefect.yaml names
DEFAULT_PORT = 4200
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PRUNE_DEPLOYMENT = "glp-prune/glp-prune-nightly"
COMPARE_DEPLOYMENT = "glp-compare/glp-compare-weekly"
# The demo's size (`glp demo`, and prefect.yaml's): the embedded MiniLM on 2,000 SST-2
# examples, 1 epoch, max length 64, lr 1e-4 (2e-5 often stays at the majority class with
# so little data), 2 of 6 layers. A run triggered by hand passes it whole, since a
# `params` given with the run replaces the deployment's whole `params` object.
DEMO_PARAMS = {"task": "sst2", "remove": 2, "train_limit": 2000, "epochs": 1.0,
               "max_length": 64, "learning_rate": 1e-4, "seeds": 1}


# ---------------------------------------------------------------------- addresses


def check_host(host: str, allow_remote: bool = False) -> None:
    """Refuse a non-loopback address: the server has no authentication.

    Raises GlpError unless ``host`` is a loopback address or ``allow_remote`` is set.
    """
    if host not in LOOPBACK_HOSTS and not allow_remote:
        raise GlpError(
            f"host {host!r} would expose the Prefect server, which has no authentication, "
            f"beyond this machine; use one of {', '.join(LOOPBACK_HOSTS)} or allow a remote "
            "host explicitly (allow_remote=True)")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def ui_url(host: str, port: int) -> str:
    return f"http://{_url_host(host)}:{port}"


def api_url(host: str, port: int) -> str:
    """What PREFECT_API_URL must be for a server on ``host:port``."""
    return f"{ui_url(host, port)}/api"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on now (the OS's choice; a later bind may race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Raises GlpError when ``host:port`` is taken (another server, or a `glp serve`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise GlpError(f"port {port} on {host} is in use ({exc.strerror}); stop what "
                           "listens there or choose another port") from None


# ---------------------------------------------------------------------- environment


def prefect_environment(home: RunHome, api: str, base: Mapping[str, str] | None = None,
                        **overrides: str) -> dict[str, str]:
    """The environment of every Prefect subprocess (server, CLI, worker, flow runs).

    ``PREFECT_API_URL`` points at the server, Prefect's home (and so the server's
    database) is ``<home>/prefect``, and ``GLP_HOME`` makes scheduled runs, which do not
    name a home, write to this run home. Telemetry is off. ``base`` defaults to this
    process's environment; ``overrides`` win over everything.
    """
    env = dict(os.environ if base is None else base)
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home.results),
    }.items():
        env.setdefault(key, value)
    no_proxy = [h for h in env.get("NO_PROXY", "").split(",") if h]
    env["NO_PROXY"] = ",".join(dict.fromkeys([*no_proxy, *LOOPBACK_HOSTS]))
    env.update({"PREFECT_API_URL": api, "PREFECT_HOME": str(home.prefect),
                "GLP_HOME": str(home.root), **overrides})
    return env


def prefect_command(*args: str) -> list[str]:
    """``prefect ARGS`` with this interpreter (so the virtualenv's Prefect and glp)."""
    return [sys.executable, "-m", "prefect", *args]


# ---------------------------------------------------------------------- the API


@contextlib.contextmanager
def prefect_client(api: str, timeout: float = 10.0) -> Iterator[Any]:
    """Prefect's own synchronous client for the server at ``api``, whatever this process's
    settings say. Its own transport: no proxy (the servers glp starts are local), and a
    refused connection fails at once instead of being retried (a health check polls)."""
    import httpx
    from prefect.client.orchestration import SyncPrefectClient

    settings = {"timeout": timeout, "transport": httpx.HTTPTransport()}
    with SyncPrefectClient(api, httpx_settings=settings) as client:
        yield client


def is_healthy(api: str) -> bool:
    """Whether ``GET <api>/health`` (Prefect's health endpoint) answers within 2 s: one
    try, since callers poll. Prefect's client retries a request that times out, with
    back-off: on a port where something else listens and never answers, that took 68 s."""
    import httpx

    try:
        with httpx.Client(transport=httpx.HTTPTransport(), timeout=2.0) as client:
            return client.get(f"{api}/health").status_code == 200
    except httpx.HTTPError:
        return False


def tail(path: Path | None, lines: int = 40) -> str:
    """The last lines of a log file, for an error message."""
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(api: str, timeout: float = 120.0, process: subprocess.Popen | None = None,
                 log: Path | None = None) -> float:
    """Wait until ``GET <api>/health`` answers; returns the seconds waited.

    Raises GlpError when ``process`` (the server) exits first, or after ``timeout``
    seconds, with the end of ``log``.
    """
    started = time.monotonic()
    while not is_healthy(api):
        if process is not None and process.poll() is not None:
            raise GlpError(f"the Prefect server exited with code {process.returncode} before "
                           f"{api} answered" + (f":\n{tail(log)}" if log else ""))
        if time.monotonic() - started > timeout:
            raise GlpError(f"the Prefect server at {api} did not answer within {timeout:.0f} s"
                           + (f":\n{tail(log)}" if log else ""))
        time.sleep(0.5)
    return time.monotonic() - started


# ---------------------------------------------------------------------- processes


def start_server(home: RunHome, port: int, host: str = "127.0.0.1", *,
                 env: Mapping[str, str] | None = None, log: Path | None = None,
                 ui: bool = True, allow_remote: bool = False) -> subprocess.Popen:
    """``prefect server start`` on ``host:port`` with its database under ``<home>/prefect``.

    Returns at once; call :func:`wait_healthy` before using the API. Raises GlpError for
    a non-loopback host unless ``allow_remote``.
    """
    check_host(host, allow_remote)
    home.create()
    env = env if env is not None else prefect_environment(home, api_url(host, port))
    command = prefect_command("server", "start", "--host", host, "--port", str(port),
                              "--ui" if ui else "--no-ui")
    return start_process(command, env, log, cwd=REPO_ROOT)


def start_worker(env: Mapping[str, str], pool: str = DEFAULT_POOL, *, run_once: bool = False,
                 limit: int | None = 1, log: Path | None = None) -> subprocess.Popen:
    """``prefect worker start`` on a process work pool.

    With ``run_once`` it polls once, runs what is due and exits when those runs end.
    ``limit`` caps concurrent flow runs (1: each fine-tune already uses every core).
    """
    args = ["worker", "start", "--pool", pool, "--type", "process"]
    if run_once:
        args.append("--run-once")
    if limit:
        args += ["--limit", str(limit)]
    return start_process(prefect_command(*args), env, log, cwd=REPO_ROOT)


def run_prefect(args: Sequence[str], env: Mapping[str, str], timeout: float = 300.0,
                what: str = "") -> str:
    """Run one Prefect CLI command from the repository root; its output, or a GlpError."""
    command = prefect_command("--no-prompt", *args)
    try:
        done = subprocess.run(command, env=dict(env), cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise GlpError(f"{what or shlex.join(args)}: no answer within {timeout:.0f} s") from exc
    output = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0:
        raise GlpError(f"{what or 'prefect ' + shlex.join(args)} failed "
                       f"(exit {done.returncode}):\n{output.strip()[-3000:]}")
    return output


def ensure_work_pool(api: str, env: Mapping[str, str], pool: str = DEFAULT_POOL) -> bool:
    """Create the process work pool unless it exists; whether it was created.

    ``prefect work-pool create`` fills in the process worker's default job template.
    """
    from prefect.exceptions import ObjectNotFound

    with prefect_client(api) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            pass
    run_prefect(["work-pool", "create", pool, "--type", "process"], env,
                what=f"creating work pool {pool!r}")
    return True


def deploy_all(env: Mapping[str, str], pool: str = DEFAULT_POOL,
               prefect_file: Path = PREFECT_FILE, timeout: float = 300.0) -> str:
    """``prefect deploy --all`` from the repository root; the CLI's output.

    For another pool than the one prefect.yaml names, deploys a copy of the file with
    that pool (``prefect deploy`` ignores ``--pool`` when it deploys several).
    """
    if pool != DEFAULT_POOL:
        import yaml

        spec = yaml.safe_load(prefect_file.read_text())
        for deployment in spec.get("deployments", []):
            deployment.setdefault("work_pool", {})["name"] = pool
        prefect_file = Path(env["PREFECT_HOME"]) / f"prefect-{pool}.yaml"
        prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return run_prefect(["deploy", "--all", "--prefect-file", str(prefect_file)], env,
                       timeout=timeout, what=f"deploying {prefect_file}")


# ---------------------------------------------------------------------- serve


def trigger_command(deployment: str = PRUNE_DEPLOYMENT, params: Mapping[str, Any] | None = None,
                    api: str | None = None) -> str:
    """The shell command that starts a run of ``deployment`` now, with ``params``."""
    values = json.dumps(dict(DEMO_PARAMS if params is None else params), separators=(",", ":"))
    prefix = f"PREFECT_API_URL={api} " if api else ""
    return (f"{prefix}prefect deployment run {shlex.quote(deployment)} "
            f"--param params={shlex.quote(values)}")


@contextlib.contextmanager
def _signals(handlers: Mapping[int, Any]):
    """Install signal handlers for a block (only the main thread may; elsewhere, none)."""
    previous = {}
    try:
        for sig, handler in handlers.items():
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(home: str | os.PathLike[str] | None = None, port: int = DEFAULT_PORT,
          host: str = "127.0.0.1", pool: str = DEFAULT_POOL, deploy: bool = True, *,
          allow_remote: bool = False, limit: int = 1, ui: bool = True,
          echo: Callable[[str], None] = print) -> int:
    """Run a Prefect server, glp's scheduled deployments and a worker until Ctrl-C.

    Args:
        home: the run home (default ``$GLP_HOME`` or ``./.glp``): Prefect's database is in
            ``<home>/prefect``, logs in ``<home>/prefect/logs``, and runs write here.
        port: the server's port.
        host: the address it listens on; loopback only, unless ``allow_remote``.
        pool: the process work pool (created if missing).
        deploy: deploy prefect.yaml's deployments (schedules included) before starting
            the worker; without it, the deployments already on the server are served.
        allow_remote: allow a non-loopback ``host`` (the server has no authentication).
        limit: flow runs at a time on this worker.
        ui: serve Prefect's UI too.
        echo: where the progress lines go.

    Returns:
        0 after Ctrl-C (or SIGTERM); the exit code of the worker or the server if one of
        them stopped by itself. Both are stopped on the way out.

    Raises:
        GlpError: a non-loopback host, a port in use, a server that does not start, or a
            deployment that fails.
    """
    check_host(host, allow_remote)
    run_home = RunHome.resolve(home).create()
    check_port_free(host, port)
    api = api_url(host, port)
    env = prefect_environment(run_home, api)
    logs = run_home.prefect / "logs"
    server_log = logs / "server.log"
    server = worker = None
    # SIGTERM (a service manager's stop) takes the same way out as Ctrl-C.
    with _signals({signal.SIGTERM: _interrupt}):
        try:
            echo(f"Starting the Prefect server on {ui_url(host, port)} "
                 f"(home {run_home.prefect}, log {server_log})")
            server = start_server(run_home, port, host, env=env, log=server_log, ui=ui,
                                  allow_remote=allow_remote)
            waited = wait_healthy(api, process=server, log=server_log)
            echo(f"Server ready after {waited:.0f} s")
            if ensure_work_pool(api, env, pool):
                echo(f"Created the process work pool {pool!r}")
            if deploy:
                echo(f"Deploying {PREFECT_FILE.name}: {PRUNE_DEPLOYMENT} (daily 02:00 UTC), "
                     f"{COMPARE_DEPLOYMENT} (Sundays 03:00 UTC)")
                deploy_all(env, pool)
            worker = start_worker(env, pool, limit=limit)
            echo("\n" + (f"Prefect UI:   {ui_url(host, port)}" if ui else f"Prefect API: {api}"))
            quoted = shlex.quote(str(run_home.root))
            echo(f"Runs write to {run_home.root} (MLflow: glp ui --home {quoted})")
            echo("Start a run now, from another terminal:")
            echo(f"  {trigger_command(PRUNE_DEPLOYMENT, api=api)}")
            echo("Worker started; Ctrl-C stops the worker and the server.")
            while True:
                for name, process in (("worker", worker), ("server", server)):
                    if process.poll() is not None:
                        echo(f"The {name} stopped by itself (exit {process.returncode}); "
                             "stopping the rest.")
                        if name == "server":
                            echo(tail(server_log))
                        return process.returncode or 1
                time.sleep(1.0)
        except KeyboardInterrupt:
            echo("Stopping the worker and the server...")
            return 0
        finally:
            # A second Ctrl-C must not cut the clean-up short and leave orphans behind.
            with _signals({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}):
                stop_process(worker)
                stop_process(server)
