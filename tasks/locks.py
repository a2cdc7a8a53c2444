"""One run of a job at a time in a run home: a second identical command waits for the first
and then reuses its results, instead of registering the same models a second time.

The lock is an advisory ``flock`` on ``<home>/locks/<job id>.lock``: the kernel releases it
when its holder exits, however it exits (SIGKILL included), so a crash leaves no stale lock.
The files stay (removing one while another process waits on it would let two runs in).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking
    fcntl = None


class JobLock:
    def __init__(self, folder: Path, job_id: str):
        self.path = Path(folder) / f"{job_id}.lock"
        self.file: IO[str] | None = None

    def acquire(self, waiting: Callable[[str], None]) -> None:
        """Hold the lock; when another process holds it, say so with ``waiting`` and block
        until it is released (Ctrl-C still stops the wait)."""
        if fcntl is None or self.file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip()
            waiting(f"another glp process{f' (pid {holder})' if holder else ''} is running "
                    "this job in this run home: waiting for it to finish, then its results "
                    "are reused")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX)
            except BaseException:
                self.release()
                raise
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            try:
                fcntl.flock(self.file, fcntl.LOCK_UN)
            finally:
                self.file.close()
                self.file = None
