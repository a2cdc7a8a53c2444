"""What every report shares: a score with its seed spread, Markdown tables, files written whole.

The terminal tables (:mod:`glp.report.terminal`), the comparison report
(:mod:`glp.report.tables`) and the cross-method report (:mod:`glp.report.pareto`) all
write scores with :func:`score` and Markdown with :func:`markdown_table`, so a number
reads the same wherever it is printed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any


def seeds(count: int) -> str:
    """``1 seed``, ``3 seeds``."""
    return f"{count} seed" + ("" if count == 1 else "s")


def score(mean: float, std: float, count: int, *, counted: bool = False) -> str:
    """A mean over seeds with its sample spread: ``0.8123 ± 0.0100``.

    One seed has no measured spread, so it is never shown as ``± 0.0000``: the score
    reads ``0.8123 (1 seed)``. With ``counted`` a spread names its seeds too
    (``0.8123 ± 0.0100 (3 seeds)``).
    """
    if count == 1:
        return f"{mean:.4f} ({seeds(1)})"
    text = f"{mean:.4f} ± {std:.4f}"
    return f"{text} ({seeds(count)})" if counted else text


def markdown_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | None = None) -> list[str]:
    """A pipe table, one line per row. ``align`` holds one ``---``, ``---:`` or ``:---:``
    per column (default: the first column left, the others right, as numbers are)."""
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |",
             "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    return lines


def write_atomic(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a temporary file in its folder, then ``os.replace`` it: an
    interrupted run never leaves a half-written report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temp, 0o644)  # mkstemp creates 0600; a report is meant to be read
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path | str, text: str) -> Path:
    """``text`` as UTF-8 in ``path``, written whole (:func:`write_atomic`)."""
    return write_atomic(path, lambda stream: stream.write(text.encode("utf-8")))
