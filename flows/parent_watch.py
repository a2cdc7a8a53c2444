"""Run a Python module as ``python -m`` would, and stop it when the process that started it
is gone, however that process ended (SIGKILL and the OOM killer included).

``python -m flows.parent_watch PID MODULE ARGS...``: a thread checks once a second that
this process's parent is still ``PID``; when it is not (the parent died and the process
was re-parented), the process gets SIGTERM (a server's graceful stop), and exits 5 s
later if it has not stopped by then. glp starts its temporary Prefect API server this way,
in a session of its own (so that Ctrl-C reaches glp only), where nothing else would stop it.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

GRACE = 5.0
"""Seconds between SIGTERM and a hard exit, once the parent is gone."""


def watch(parent: int, interval: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE)
    os._exit(1)


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m flows.parent_watch PARENT_PID MODULE [ARGS...]")
    parent, module = int(sys.argv[1]), sys.argv[2]
    if os.getppid() != parent:
        sys.exit(1)  # the parent died before we started
    threading.Thread(target=watch, args=(parent,), daemon=True, name="parent-watch").start()
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
