"""Progress reporting hooks: the CLI installs a reporter, tasks and flows call it.

A reporter lives in the process that shows the bars; a task running elsewhere (a Dask
or Ray worker) finds the default no-op reporter and reports nothing.

The same hooks carry a stop request: once a flow is interrupted (SIGTERM, Ctrl-C), the
fine-tunes running or queued in this process stop at their next training step instead of
running to the end while the process waits for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol


class Reporter(Protocol):
    def begin(self, kind: str, label: str, total: int | None) -> object: ...
    def update(self, handle: object, completed: int, total: int | None = None) -> None: ...
    def end(self, handle: object) -> None: ...
    def note(self, message: str) -> None: ...


class NullReporter:
    def begin(self, kind: str, label: str, total: int | None) -> object:
        return None

    def update(self, handle: object, completed: int, total: int | None = None) -> None:
        pass

    def end(self, handle: object) -> None:
        pass

    def note(self, message: str) -> None:
        pass


_reporter: Reporter = NullReporter()


def set_reporter(reporter: Reporter | None) -> None:
    """Install ``reporter`` for this process (None restores the no-op one)."""
    global _reporter
    _reporter = reporter or NullReporter()


def get_reporter() -> Reporter:
    return _reporter


class Interrupted(BaseException):
    """A fine-tune stopped because its process was asked to stop.

    A BaseException, like KeyboardInterrupt, so that Prefect does not retry the task.
    """


_stop = threading.Event()


def request_stop() -> None:
    """Ask every fine-tune in this process to stop at its next training step."""
    _stop.set()


def clear_stop() -> None:
    """Forget an earlier stop request (a new flow run starts)."""
    _stop.clear()


def stop_requested() -> bool:
    return _stop.is_set()


def check_stop() -> None:
    """Raise ``Interrupted`` if this process was asked to stop."""
    if _stop.is_set():
        raise Interrupted("stopped: the run was interrupted")


def step_callback(label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A training-step callback for ``glp.training.train.fine_tune`` and the function that
    closes it."""
    reporter = get_reporter()
    handle = reporter.begin("steps", label, None)

    def on_step(done: int, total: int) -> None:
        check_stop()
        reporter.update(handle, done, total)

    return on_step, lambda: reporter.end(handle)
