"""The Prefect API server a ``glp prune``/``compare``/``compress`` command's flow runs
report to, started by the command itself (:func:`start_run_server`), and the migrated
database every new home starts from (:func:`seed_database`).

Why not Prefect's temporary server: Ctrl-C in a terminal sends SIGINT to the whole
foreground process group, and the temporary server that Prefect starts for a flow run
without ``PREFECT_API_URL`` is a child in that group. It died while the flow still needed
it: glp then spent minutes printing connection errors, exited 1 and could leave the MLflow
run RUNNING. Prefect has no setting that starts that server in a session of its own, so glp
starts the same server itself, through public interfaces only: uvicorn's ``--factory``
serving ``prefect.server.api.server:create_app`` (Prefect's documented app factory, the app
``prefect server start`` serves) in a new session, so that only glp gets Ctrl-C and stops
its fine-tunes, closes its runs, then stops the server. The flow runs are pointed at it with
the setting ``PREFECT_API_URL`` (``prefect.settings.temporary_settings``).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from pathlib import Path

from flows.processes import ask_to_stop, start_process
from flows.serve import REPO_ROOT, api_url, free_port, wait_healthy
from glp import GlpError
from tasks import templates

STARTUP_FAILURE = 3
"""uvicorn's exit code when the server did not start (a taken port, or a failed app start)."""
RUN_SERVER_OFF = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "REPOSSESSOR", "PAUSE_EXPIRATIONS",
                  "CANCELLATION_CLEANUP", "CLEANUP_RECONCILER")
"""Server services that only deployments and workers need (Prefect's temporary server
runs none of them either): a command's own server leaves them off."""
_run_server: tuple[subprocess.Popen, str] | None = None
_creates_database = False
"""Whether this process's server creates its home's database (then the migrated, empty
database becomes the template once the server answers)."""


# ------------------------------------------------------------------ the migrated database


def template_path() -> Path:
    """Where a new, migrated database of this Prefect version is kept for this user
    (:func:`tasks.templates.template_path`)."""
    import prefect

    return templates.template_path(f"prefect-{prefect.__version__}.db")


def home_database() -> Path | None:
    """The sqlite file the run's Prefect server will use, from Prefect's own settings
    (environment, profile or temporary settings alike); None for another database."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix) or url.endswith(":memory:") or "?" in url:
        return None
    return Path(url.removeprefix(prefix))


def seed_database() -> bool:
    """Start a new home's Prefect database as a copy of the migrated template: a server on
    a new database spends most of its start creating tables (measured in
    docs/benchmarks.md). Nothing happens when the database exists, when there is no
    template yet, or when Prefect's settings name a database that is not a sqlite file."""
    database = home_database()
    return database is not None and templates.seed(database, template_path())


def save_template() -> None:
    """Keep the run's new database, migrated and still empty, as the template for later
    homes (Prefect turns write-ahead logging on again when it opens a copy)."""
    database = home_database()
    if database is not None:
        templates.keep(database, template_path())


# ------------------------------------------------------------------ the server


def start_run_server() -> tuple[subprocess.Popen, str]:
    """A Prefect API server for this process's flow runs: the process and its API URL.

    Started once per process (the next call returns the same one while it runs) and asked
    to stop when the process exits, after Prefect has sent what it still holds. Returns
    at once: :func:`wait_healthy` before the first flow run.

    As Prefect's temporary server does,
    it serves no UI (``PREFECT_SERVER_UI_ENABLED``) and none of the :data:`RUN_SERVER_OFF`
    services (``PREFECT_SERVER_SERVICES_<NAME>_ENABLED``), and its database is in
    ``PREFECT_HOME``: a new home's starts as a copy of the migrated template
    (:func:`seed_database`). Prefect's telemetry (``PREFECT_SERVER_ANALYTICS_ENABLED``) is
    off.
    """
    global _run_server, _creates_database
    if _run_server is not None and _run_server[0].poll() is None:
        return _run_server
    database = home_database()
    _creates_database = (database is not None and not database.exists()
                         and not seed_database())
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
    for key, value in {"PREFECT_SERVER_UI_ENABLED": "false",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       # glp's flows use no block types: registering all of them on a new
                       # database took 4 s of the server's start here (15.5 s against 11.2).
                       "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
                       **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false"
                          for name in RUN_SERVER_OFF}}.items():
        env.setdefault(key, value)
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
               str(port), "--log-level", "error"]
    process = start_process(command, env, log=None, cwd=REPO_ROOT)
    # Registered before Prefect's own exit handlers, so it runs after they have drained.
    # Not waited for: its graceful stop took 1.2 s of every command's exit here.
    atexit.register(ask_to_stop, process)
    _run_server = process, api_url("127.0.0.1", port)
    return _run_server


def run_server_settings(api: str):
    """The settings a command's flow runs take while they report to its own server at
    ``api`` (``prefect.settings.temporary_settings``): ``PREFECT_API_URL``, and no flow-run
    heartbeats (``flows.heartbeat_frequency``) unless the user set them.

    Heartbeats let a long-lived server mark a run whose process died as crashed; this
    server lives and dies with the run, so nothing reads them. The flow's exit joins the
    heartbeat thread, which sleeps in 1 s steps (0.5 s in one run sampled with py-spy; no
    difference measurable in the tiny job's wall time, docs/benchmarks.md).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    updates: dict = {PREFECT_API_URL: api}
    if "heartbeat_frequency" not in get_current_settings().flows.model_fields_set:
        updates["flows.heartbeat_frequency"] = None
    return temporary_settings(updates=updates)


def run_server_ready(timeout: float) -> str:
    """Start :func:`start_run_server`'s server and wait until it answers; its API URL.

    A start that fails (uvicorn exits with :data:`STARTUP_FAILURE`) is tried again on a
    new port, as Prefect's temporary server does: two commands started at the same moment
    on one new home start two servers on one database, and one of them failed while the
    other created it. Raises GlpError on any other exit, or after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        process, api = start_run_server()
        try:
            wait_healthy(api, timeout=max(deadline - time.monotonic(), 0.0), process=process)
            if _creates_database:  # before any flow run writes to it
                save_template()
            return api
        except GlpError:
            if process.returncode != STARTUP_FAILURE or time.monotonic() >= deadline:
                raise
