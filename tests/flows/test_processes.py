"""Child processes in sessions of their own, stopped with everything they started."""

from __future__ import annotations

import os
import sys
import time

import psutil

from flows import serve
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
    assert not [pid for pid in pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert descendants(process.pid) == []


def test_stop_process_of_nothing_is_none():
    assert stop_process(None) is None


def test_a_server_that_is_not_there_is_not_healthy_at_once():
    api = serve.api_url("127.0.0.1", serve.free_port())
    started = time.monotonic()
    assert serve.is_healthy(api) is False
    assert time.monotonic() - started < 1.0  # no retried connections while polling
