"""Child processes in sessions of their own, stopped with everything they started."""

from __future__ import annotations

import os
import sqlite3
import sys
import time

import psutil
import pytest

from flows import run_server, serve
from flows.processes import descendants, start_process, stop_process

# A parent that starts one child in its own group and one in a session of its own (as a
# worker starts its flow runs), prints their pids, then waits.
TREE = """
import subprocess, sys, time
sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
own = subprocess.Popen(sleep)
isolated = subprocess.Popen(sleep, start_new_session=True)
print(own.pid, isolated.pid, flush=True)
time.sleep(120)
"""


def test_stop_process_stops_the_child_and_all_it_started(tmp_path):
    log = tmp_path / "tree.log"
    process = start_process([sys.executable, "-c", TREE], os.environ, log)
    deadline = time.monotonic() + 30
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p) for p in log.read_text().split()]
    assert os.getsid(process.pid) == process.pid != os.getsid(0)  # a session of its own
    assert {p.pid for p in descendants(process.pid)} == set(pids)
    started = time.monotonic()
    assert stop_process(process, grace=5.0, settle=0.0) is not None
    assert time.monotonic() - started < 15
    assert not _alive(pids)
    assert descendants(process.pid) == []


def _alive(pids: list[int], settle: float = 5.0) -> list[int]:
    """The pids still running ``settle`` seconds from now: a killed process whose parent
    died is reaped by init a moment later, and in that moment it still shows as running."""
    deadline = time.monotonic() + settle
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_stop_process_of_nothing_is_none():
    assert stop_process(None) is None


def test_a_server_that_is_not_there_is_not_healthy_at_once():
    api = serve.api_url("127.0.0.1", serve.free_port())
    started = time.monotonic()
    assert serve.is_healthy(api) is False
    assert time.monotonic() - started < 1.0  # no retried connections while polling


def test_a_port_that_never_answers_is_not_healthy_within_seconds():
    """Something else listens on the port and never answers (a taken port): one try, with
    its timeout, not a client's retries (68 s here)."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        assert serve.is_healthy(serve.api_url("127.0.0.1", silent.getsockname()[1])) is False
        assert time.monotonic() - started < 5.0


@pytest.mark.slow  # starts Prefect API servers
def test_run_server_starts_again_when_its_start_fails(tmp_path, monkeypatch):
    # Two commands started at the same moment on one new home start two servers on one
    # database: one server's start fails (uvicorn exits 3) while the other migrates it.
    # A taken port fails the start the same way, every time.
    import socket

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setattr(run_server, "_run_server", None)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    real = serve.free_port
    monkeypatch.setattr(run_server, "free_port", lambda *a: ports.pop() if ports else real(*a))
    try:
        api = run_server.run_server_ready(timeout=120)
        process = run_server._run_server[0]
        assert serve.is_healthy(api)
        assert str(taken.getsockname()[1]) not in api
    finally:
        taken.close()
        if run_server._run_server is not None:
            stop_process(run_server._run_server[0], grace=5.0, settle=0.0)
    assert process.poll() is not None


def _database(url: str):
    """Prefect's database setting for a block, whatever the session set (the flow tests'
    shared test server sets its own)."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_DATABASE_CONNECTION_URL: url})


@pytest.mark.slow  # starts Prefect API servers
def test_a_new_home_starts_from_the_migrated_template(tmp_path, monkeypatch):
    """The first new home's server migrates its database and keeps it, empty, as the
    template; the next new home's database is a copy of it, made before its server starts,
    and that server answers on it."""
    monkeypatch.setenv("GLP_CACHE_DIR", str(tmp_path / "cache"))
    created = []
    for home in ("first", "second"):
        monkeypatch.setattr(run_server, "_run_server", None)
        (tmp_path / home).mkdir()  # a home's prefect/ folder exists before its server starts
        with _database(f"sqlite+aiosqlite:///{tmp_path / home / 'prefect.db'}"):
            try:
                api = run_server.run_server_ready(timeout=120)
                created.append(run_server._creates_database)
                with serve.prefect_client(api) as client:
                    assert client.read_flow_runs() == []
            finally:
                if run_server._run_server is not None:
                    stop_process(run_server._run_server[0], grace=5.0, settle=0.0)
    assert created == [True, False]  # the second home's was the template's copy
    template = run_server.template_path()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [template.name]  # one file


def test_a_home_with_a_database_or_another_database_is_not_seeded(tmp_path, monkeypatch):
    monkeypatch.setenv("GLP_CACHE_DIR", str(tmp_path / "cache"))
    template = run_server.template_path()
    template.parent.mkdir()
    sqlite3.connect(template).execute("create table t (x)").connection.commit()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "prefect.db").write_bytes(b"the home's own")
    with _database(f"sqlite+aiosqlite:///{tmp_path / 'home' / 'prefect.db'}"):
        assert not run_server.seed_database()
    assert (tmp_path / "home" / "prefect.db").read_bytes() == b"the home's own"
    with _database("postgresql+asyncpg://db/prefect"):
        assert run_server.home_database() is None and not run_server.seed_database()
    with _database(f"sqlite+aiosqlite:///{tmp_path / 'other' / 'prefect.db'}"):
        assert run_server.seed_database()
    tables = sqlite3.connect(tmp_path / "other" / "prefect.db").execute(
        "select name from sqlite_master").fetchall()
    assert tables == [("t",)] and [p.name for p in (tmp_path / "other").iterdir()] == [
        "prefect.db"]  # no partial copy left


def test_flow_runs_on_the_commands_own_server_send_no_heartbeats():
    from prefect.settings import get_current_settings, temporary_settings

    api = "http://127.0.0.1:9/api"
    with run_server.run_server_settings(api):
        settings = get_current_settings()
        assert settings.api.url == api and settings.flows.heartbeat_frequency is None
    assert get_current_settings().api.url != api  # for this command's flow runs only
    with temporary_settings(updates={"flows.heartbeat_frequency": 60}):  # the user's own
        with run_server.run_server_settings(api):
            assert get_current_settings().flows.heartbeat_frequency == 60
