"""What code computed a result: a fingerprint for cache keys that sees code changes.

A cached fine-tune must be recomputed when the code that produced it changes, not only
when its inputs do. ``code_fingerprint("tasks.training")`` hashes the source of that
module and of every first-party module it imports, directly or through others (found
by reading their ``import`` statements, so nothing is executed), together with the
versions of torch and transformers. Editing ``glp/training/train.py`` or ``glp/core/surgery.py``
therefore changes the key of every fine-tune, while editing ``glp/report/tables.py``, which no
fine-tune runs, changes none.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

FIRST_PARTY = ("glp", "tasks", "flows")
"""Packages whose source is part of a fingerprint; third-party code counts by version."""


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_names(path: Path, module: str) -> set[str]:
    """First-party modules named by ``path``'s import statements (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.add(source)
            # ``from glp.training import train`` imports the module glp.training.train.
            names.update(f"{source}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        if name.split(".")[0] not in FIRST_PARTY:
            continue
        # ``import glp.training.train`` also runs glp/__init__.py.
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def source_closure(*modules: str) -> dict[str, Path]:
    """The first-party modules that ``modules`` import, transitively, with their files."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue  # a name that is not a module (a function imported from a module)
        seen[name] = path
        todo.extend(_imported_names(path, name) - seen.keys())
    return dict(sorted(seen.items()))


def library_versions() -> dict[str, str]:
    """The versions of the third-party code a fine-tune runs."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def code_fingerprint(*modules: str, versions: dict[str, str] | None = None) -> str:
    """A short hash of the source closure of ``modules`` and of torch's and transformers'
    versions (or ``versions`` when given). Cached per process."""
    chosen = library_versions() if versions is None else versions
    return _fingerprint(tuple(modules), tuple(sorted(chosen.items())))


@functools.lru_cache(maxsize=32)
def _fingerprint(modules: tuple[str, ...], versions: tuple[tuple[str, str], ...]) -> str:
    digest = hashlib.sha256()
    for name, path in source_closure(*modules).items():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name, version in versions:
        digest.update(f"{name}=={version}\0".encode())
    return digest.hexdigest()[:16]


def clear_cache() -> None:
    """Forget computed fingerprints (for a process that edits its own source, e.g. a test)."""
    _fingerprint.cache_clear()
