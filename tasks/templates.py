"""Migrated, empty databases kept per user, so that a new run home starts from a copy.

Prefect's API server and MLflow's sqlite store both create a new database by running
their migrations: 4 s of a Prefect server's start and 1.5 s of opening a new MLflow store
(measured in docs/benchmarks.md). A new home's database is instead a copy of one that an
earlier home created with the same package version, kept in ``$GLP_CACHE_DIR`` or
``$XDG_CACHE_HOME/glp`` (``~/.cache/glp``). A missing or unwritable cache only means that
the database is created as usual.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path


def template_path(name: str) -> Path:
    """Where the template ``name`` (``prefect-3.8.8.db``) is kept for this user."""
    root = os.environ.get("GLP_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glp"
    return Path(root) / name


def seed(database: Path, template: Path) -> bool:
    """Start ``database`` as a copy of ``template``; whether it did. Nothing happens when
    the database exists or there is no template. The copy appears whole or not at all (a
    link that fails if another process created the database first)."""
    if database.exists() or not template.is_file():
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    partial = database.with_name(f".{database.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(template, partial)
        os.link(partial, database)
    except OSError:  # created meanwhile, or the copy failed: it is created as usual
        return False
    finally:
        partial.unlink(missing_ok=True)
    return True


def keep(database: Path, template: Path,
         empty: Callable[[sqlite3.Connection], None] | None = None) -> None:
    """Keep a newly created ``database`` as ``template`` unless one exists: a consistent
    copy (sqlite's online backup, so a process writing to it is no harm) as one file in
    rollback-journal mode, and ``empty`` then removes what the copy must not carry over."""
    if not database.is_file() or template.is_file():
        return
    with contextlib.suppress(OSError, sqlite3.Error):
        template.parent.mkdir(parents=True, exist_ok=True)
        partial = template.with_name(f".{template.name}.tmp-{os.getpid()}")
        try:
            with contextlib.closing(sqlite3.connect(database)) as src, \
                    contextlib.closing(sqlite3.connect(partial)) as dst:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")
                if empty is not None:
                    empty(dst)
                    dst.commit()
            os.replace(partial, template)
        finally:
            partial.unlink(missing_ok=True)
