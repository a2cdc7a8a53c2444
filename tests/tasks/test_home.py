"""The run home: stale temporary folders, glp gc, and a home that cannot be written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glp import GlpError
from tasks.home import RunHome, collect_garbage


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _populated(tmp_path) -> RunHome:
    home = RunHome(tmp_path / "home").create()
    for folder in ("candidates/k1", "finals/k2", f"finals/k3.tmp-{_dead_pid()}",
                   f"finals/k4.tmp-{os.getpid()}"):
        (home.artifacts / folder).mkdir(parents=True)
        (home.artifacts / folder / "model.safetensors").write_bytes(b"x" * 100)
    (home.token_cache / "t.arrow").write_bytes(b"y" * 10)
    home.mlflow_db.write_bytes(b"db")
    (home.parquet / "finals").mkdir()
    return home


def test_half_written_checkpoints_of_dead_processes_are_removed(tmp_path):
    home = _populated(tmp_path)
    removed = home.remove_stale_temporaries()
    assert [p.name for p in removed] == [n.name for n in removed if ".tmp-" in n.name]
    assert len(removed) == 1
    left = sorted(p.name for p in (home.artifacts / "finals").iterdir())
    assert left == ["k2", f"k4.tmp-{os.getpid()}"]  # a live process's folder stays


def test_gc_removes_what_no_run_needs_and_keeps_the_rest(tmp_path):
    home = _populated(tmp_path)
    listed = collect_garbage(home, dry_run=True)
    assert {p.name for p, _ in listed} == {"candidates", "tokens", listed[-1][0].name}
    assert (home.artifacts / "candidates").exists()  # a dry run removes nothing
    freed = collect_garbage(home)
    assert sum(size for _, size in freed) == 100 + 10 + 100
    assert not (home.artifacts / "candidates").exists() and not home.token_cache.exists()
    assert (home.artifacts / "finals" / "k2").exists() and home.mlflow_db.exists()
    assert (home.parquet / "finals").exists()
    collect_garbage(home, finals=True)
    assert not (home.artifacts / "finals").exists() and not home.results.exists()
    assert home.mlflow_db.exists() and (home.parquet / "finals").exists()


def test_an_unwritable_home_is_one_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(GlpError, match=r"--home .*file/home: cannot write there"):
        RunHome(blocker / "home").ensure_writable()


def test_gc_counts_only_the_bytes_it_frees_when_the_registry_links_them(tmp_path):
    """A registered version hard-links its checkpoint and its int8 graph: removing the
    home's copy frees nothing, and the home's size counts each file once."""
    from tasks.home import folder_size

    home = _populated(tmp_path)
    weights = home.artifacts / "finals" / "k2" / "model.safetensors"
    registered = home.root / "mlruns" / "models" / "m-1" / "artifacts"
    registered.mkdir(parents=True)
    os.link(weights, registered / "model.safetensors")
    alone = home.artifacts / "finals" / "k5" / "model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes(b"z" * 40)
    before = folder_size(home.root)
    assert before == sum(f.stat().st_size for f in home.root.rglob("*") if f.is_file()) - 100
    freed = dict(collect_garbage(home, finals=True, dry_run=True))
    assert freed[home.artifacts / "finals"] == 40 + 100 + 100  # k5, k3 and k4 (k2 linked)
    collect_garbage(home, finals=True)
    assert (registered / "model.safetensors").read_bytes() == b"x" * 100
