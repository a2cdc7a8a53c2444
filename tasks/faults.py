"""Fault injection: make named points in the tasks fail on purpose, for tests and drills.

``GLP_FAULTS`` lists points and how they fail, comma-separated:

- ``fine-tune=2``: the first 2 calls of the point fail (a transient fault; retries heal it);
- ``evaluate=always``: every call fails (a permanent fault: the run fails);
- ``fine-tune=after:3``: the first 3 calls succeed, every later one fails.

Points: ``fine-tune``, ``evaluate``, ``log`` (MLflow child runs), ``record`` (Parquet
parts), ``register`` (model registry). Counts are kept per process. Unset, nothing fails
and the cost is one environment lookup per call.
"""

from __future__ import annotations

import errno
import os
import threading

POINTS = ("fine-tune", "evaluate", "log", "record", "register")
_calls: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """A failure asked for by ``GLP_FAULTS``."""


def _rules(spec: str) -> dict[str, str]:
    rules = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, how = item.partition("=")
        if point not in POINTS:
            choices = ", ".join(POINTS)
            raise ValueError(f"GLP_FAULTS: unknown point '{point}'; choose from {choices}")
        rules[point] = how or "1"
    return rules


def inject(point: str) -> None:
    """Raise ``InjectedFault`` if ``GLP_FAULTS`` says this call of ``point`` fails."""
    spec = os.environ.get("GLP_FAULTS")
    if not spec:
        return
    how = _rules(spec).get(point)
    if how is None:
        return
    with _lock:
        call = _calls.get((spec, point), 0) + 1
        _calls[spec, point] = call
    if how == "always":
        fails = True
    elif how.startswith("after:"):
        fails = call > int(how.removeprefix("after:"))
    else:
        fails = call <= int(how)
    if fails:
        raise InjectedFault(f"injected fault at {point} (call {call}, GLP_FAULTS={spec})")


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


FULL_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull",
                   "QuotaExceeded")
"""How libraries that do not raise OSError say it: safetensors' Rust writer raises
``SafetensorError: ... IoError(Os { code: 28, kind: StorageFull, ... })``."""


def is_full_disk(exc: BaseException | None) -> bool:
    """A write failed because the disk (or the user's quota) is full: an OSError with
    that errno, or an error (or one it was raised from) that says so."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in FULL_DISK:
            return True
        if any(text in str(exc) for text in FULL_DISK_TEXTS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def retry_unless_hopeless(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task unless retrying cannot help.
    Bad input (a GlpError) and a full disk do not clear themselves."""
    from glp import GlpError

    return not (isinstance(state.data, GlpError) or is_full_disk(state.data))


def full_disk_message(home, model: str | None) -> str:
    """One line for a run stopped by a full disk: the run home, the space left on its
    device, what one checkpoint of the model takes, and what to do."""
    import shlex
    import shutil
    from pathlib import Path

    root = Path(home)
    probe = root if root.exists() else root.parent
    free = shutil.disk_usage(probe).free if probe.exists() else None
    need = None
    try:
        from glp.core.models import resolve_model

        folder = Path(resolve_model(model))
        need = sum(f.stat().st_size for f in folder.glob("*.safetensors")) or None
    except Exception:  # noqa: BLE001 - a size we cannot tell is left out of the message
        pass
    left = f"{free / 1e6:,.0f} MB free" if free is not None else "no space"
    size = (f"; each checkpoint of the model takes about {need / 1e6:,.0f} MB, and a run "
            "keeps one per final model and seed" if need else "")
    return (f"no space left on the device of the run home {root} ({left}{size}): free some "
            f"space (glp gc --home {shlex.quote(str(root))} removes what no run needs) and "
            "run the same command again; finished work is kept")
