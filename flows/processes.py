"""Child processes that run in sessions of their own, and are stopped with all they started.

A child in its own session gets no Ctrl-C from the terminal (SIGINT goes to the foreground
process group), so the process that started it stops it, in order, on its way out. Processes
are inspected with psutil: a listed process remembers its start time, so a signal never
reaches another process that reused its pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import psutil


def start_process(command: list[str], env: Mapping[str, str], log: Path | None,
                  cwd: Path | None = None) -> subprocess.Popen:
    """A child in its own session, so Ctrl-C reaches only us and we stop it in order;
    its output appended to ``log`` (None: this process's own stdout and stderr).

    A ``python -m MODULE`` command runs under :mod:`flows.parent_watch`: it stops when
    this process is gone, even one killed with SIGKILL, which runs no exit handler.
    """
    if command[:2] == [sys.executable, "-m"]:
        command = [sys.executable, "-m", "flows.parent_watch", str(os.getpid()), *command[2:]]
    output: IO[bytes] | None = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        output = log.open("ab")
    try:
        return subprocess.Popen(command, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=output, stderr=subprocess.STDOUT if output else None,
                                start_new_session=True)
    finally:
        if output is not None:
            output.close()  # the child holds its own descriptor


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` ([] once it is gone). A listed process remembers its
    start time, so a signal never reaches another process that reused its pid."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pgid: int, sig: int) -> None:
    if pgid == os.getpgrp():
        return  # never our own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _running(process: psutil.Process) -> bool:
    """Still the process that was listed, and not a zombie waiting to be reaped."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_listed(listed: list[psutil.Process], sig: int) -> None:
    """``sig`` to each listed process that still runs, and to its process group."""
    for process in listed:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if process.is_running():
                _signal_group(os.getpgid(process.pid), sig)
                process.send_signal(sig)


def ask_to_stop(process: subprocess.Popen) -> None:
    """Ctrl-C to a child's process group, without waiting for it to exit: for a server
    this process no longer needs on its way out (it stops by itself within a second or
    two; :mod:`flows.parent_watch` ends it if it does not)."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGINT)


def stop_process(process: subprocess.Popen | None, grace: float = 20.0,
                 settle: float = 3.0) -> int | None:
    """Stop a child started here, and everything it started; its exit code.

    Processes it started in sessions of their own (a worker's flow runs) get SIGTERM
    first; ``settle`` seconds after they end, the worker has reported their runs as
    crashed (not left running). Then its process group gets SIGINT (Ctrl-C), and after
    ``grace`` seconds SIGKILL, as does anything it started that is still there. A process
    is only signalled while it is the one that was listed (no pid reuse accidents).
    """
    if process is None:
        return None
    below = descendants(process.pid)
    session = _session(process.pid)
    isolated = [p for p in below if session is not None and _running(p)
                and _session(p.pid) not in (None, session)]
    if isolated and process.poll() is None:
        _signal_listed(isolated, signal.SIGTERM)
        deadline = time.monotonic() + grace / 2
        while time.monotonic() < deadline and any(_running(p) for p in isolated):
            time.sleep(0.2)
        time.sleep(settle)  # the worker sees the exit code and reports the crash
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGINT)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(10)
    _signal_group(process.pid, signal.SIGKILL)  # members left in its group
    _signal_listed(below, signal.SIGKILL)
    return process.returncode
