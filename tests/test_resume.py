"""Crash and resume with real processes: kill -9 a running ``glp prune`` at several
points, run the same command again, and get exactly the uninterrupted result; SIGTERM
stops a run within a training step and closes it cleanly; two runs with different
parameters at once in one home do not corrupt each other."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests

REPO = Path(__file__).resolve().parent.parent
TOTAL = 11  # 3 + 2 candidates, then 3 depths x 2 seeds


def _command(model: Path, home: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "prune", "--model", str(model), "--task", "sst2",
            "--remove", "2", "--train-limit", "80", "--eval-limit", "40", "--epochs", "1",
            "--max-length", "16", "--lr", "1e-3", "--batch-size", "16", "--seeds", "2",
            "--home", str(home), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def _run(model: Path, home: Path, *extra: str) -> str:
    done = subprocess.run(_command(model, home, *extra), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _counts(output: str) -> tuple[int, int]:
    match = re.search(r"fine-tunes: (\d+) computed, (\d+) reused", output)
    assert match, output
    return int(match[1]), int(match[2])


def _finished(home: Path, kind: str) -> int:
    folder = home / "artifacts" / kind
    return sum(1 for p in folder.iterdir() if ".tmp-" not in p.name) if folder.is_dir() else 0


def _tables(home: Path) -> dict[str, list[dict]]:
    return {table: ds.dataset(home / "parquet" / table).to_table().to_pylist()
            for table in ("candidates", "selections", "finals")}


def _results(home: Path) -> dict:
    tables = _tables(home)
    return {
        "order": [r["layer"] for r in sorted(tables["selections"], key=lambda r: r["iteration"])],
        "candidates": sorted((tuple(r["removed"]), r["value"]) for r in tables["candidates"]),
        "finals": sorted((r["depth"], r["seed"], r["value"]) for r in tables["finals"]),
    }


def _runs(home: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000)


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    home = tmp_path_factory.mktemp("uninterrupted")
    computed, reused = _counts(_run(tiny_bert, home))
    assert (computed, reused) == (TOTAL, 0)
    return _results(home)


def _servers(home: Path) -> list[int]:
    """Process ids of the temporary Prefect API servers started for runs in ``home``
    (they run in a session of their own, found by their PREFECT_HOME)."""
    wanted = f"PREFECT_HOME={home / 'prefect'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if wanted in environ and b"uvicorn" in cmdline:
            found.append(int(proc.name))
    return found


def _kill_group(process: subprocess.Popen, home: Path | None = None) -> None:
    """SIGKILL the command's process group and, with ``home``, the temporary API servers
    that a crash of the command orphaned."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in _servers(home) if home is not None else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def start():
    """Start a command in its own process group; the group is killed when the test ends,
    whether it passed or not (the ephemeral API server included)."""
    started = []

    def _start(command: list[str]) -> subprocess.Popen:
        # Ctrl-C as in a terminal: a shell that started the tests in the background (nohup,
        # `&`) passes SIGINT on as ignored, and a process that inherits that ignores Ctrl-C.
        process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True,
                                   preexec_fn=_default_sigint)
        started.append((process, Path(command[command.index("--home") + 1])))
        return process

    yield _start
    for process, home in started:
        _kill_group(process, home)
        process.communicate()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"finished before {what}: {process.communicate()}")
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.01)


def _naming(home: Path) -> list[int]:
    """Process ids of every process whose environment names ``home`` (whatever glp
    started for a run there: it passes the home to its children in PREFECT_HOME)."""
    wanted = str(home).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if wanted in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


# (what to watch, how many finished, what is killed): glp alone, as a crash would, or its
# whole process group, as the OOM killer or a CI timeout would. The API server runs in a
# session of its own, outside that group, so in both cases it must not outlive glp.
KILL_POINTS = {
    "first-candidate": ("candidates", 1, "process"),  # inside iteration 1
    "second-iteration": ("candidates", 4, "group"),  # inside iteration 2
    "finals": ("finals", 2, "process"),  # among the final models
    "registry": ("finals", 6, "group"),  # every fine-tune done: evaluation, registry, tables
}


def _checkpoints(home: Path) -> dict[Path, tuple[int, int]]:
    """Every finished fine-tune's weights, and the file's inode and modification time (a
    fine-tune done again writes a new file in its place)."""
    return {path: (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in home.glob("artifacts/*/*/model.safetensors") if ".tmp-" not in str(path)}


def test_kill_9_again_and_again_leaves_no_process_and_repeats_no_finished_work(
        tiny_bert, tmp_path, reference, start):
    """The same command killed at each point in turn, each time resumed from where the last
    attempt got to (as a scheduler that retries a crashed job would), then run to the end:
    no process outlives any kill, each attempt redoes at most the fine-tune the kill
    interrupted, and the result is the uninterrupted run's, with no duplicate rows."""
    home = tmp_path / "home"
    # Candidates' weights are kept here only to see from outside how far the run got.
    command = _command(tiny_bert, home, "--keep-candidates")
    seen: dict[Path, tuple[int, int]] = {}
    for point, (kind, count, killed) in KILL_POINTS.items():
        process = start(command)
        _wait_for(lambda k=kind, n=count: _finished(home, k) >= n, process, point)
        assert _servers(home), "the run's own API server is running"
        if killed == "group":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while _naming(home) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _naming(home), f"{point}: a process glp started outlived it"
        now = _checkpoints(home)
        redone = [path for path, stamp in seen.items() if now.get(path, stamp) != stamp]
        assert len(redone) <= 1, (point, redone)  # the one an earlier kill interrupted
        print(f"{point}: {len(now)} fine-tunes finished, {len(redone)} done again")
        seen = now

    computed, reused = _counts(_run(tiny_bert, home, "--keep-candidates"))
    assert computed + reused == TOTAL
    # Every finished fine-tune is reused; at most the interrupted one is done again (its
    # checkpoint may be written while its result was not yet recorded).
    assert reused >= len(seen) - 1 and computed <= TOTAL - len(seen) + 1
    now = _checkpoints(home)
    assert len([path for path, stamp in seen.items() if now[path] != stamp]) <= 1
    assert _results(home) == reference
    tables = _tables(home)
    assert [len(tables[t]) for t in ("candidates", "selections", "finals")] == [5, 2, 6]
    assert len({r["cache_key"] for r in tables["candidates"]}) == 5  # no duplicate rows
    runs = _runs(home)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parent = [r for r in runs if r.data.tags.get("glp.kind") == "job"]
    assert len(parent) == 1 and parent[0].data.tags["glp.attempts"] == str(len(KILL_POINTS) + 1)


def _terminate(process: subprocess.Popen) -> tuple[float, str]:
    """SIGTERM the command alone, as a scheduler would; seconds until it exited, stderr."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    return time.monotonic() - sent, stderr


def _job_runs(home: Path) -> list:
    return [r for r in _runs(home) if r.data.tags.get("glp.kind") == "job"]


def test_sigterm_stops_a_long_fine_tune_within_seconds(tiny_bert, tmp_path, start):
    # 4,000 epochs of 80 examples: each candidate alone would train for minutes.
    home = tmp_path / "home"
    command = _command(tiny_bert, home)
    command[command.index("--epochs") + 1] = "4000"
    process = start(command)
    tokens = home / "cache" / "tokens"  # written just before the first fine-tune
    _wait_for(lambda: tokens.is_dir() and any(tokens.iterdir()), process, "the first fine-tune")
    time.sleep(3)  # inside its training loop
    seconds, stderr = _terminate(process)
    print(f"exited {seconds:.1f} s after SIGTERM")
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert seconds < 30
    assert "interrupted by SIGTERM" in stderr and "run the same command again" in stderr
    assert "Crash detected" not in stderr  # one line, not one per stopped task
    assert _finished(home, "candidates") == 0
    assert [r.info.status for r in _job_runs(home)] == ["KILLED"]
    assert not [r for r in _runs(home) if r.info.status == "RUNNING"]


def test_sighup_a_closed_terminal_stops_cleanly_and_stops_the_api_server(tiny_bert, tmp_path,
                                                                         start):
    """The temporary API server runs in a session of its own (for Ctrl-C), so a closed
    terminal's SIGHUP does not reach it: glp must stop it on the way out."""
    home = tmp_path / "home"
    command = _command(tiny_bert, home)
    command[command.index("--epochs") + 1] = "4000"
    process = start(command)
    tokens = home / "cache" / "tokens"
    _wait_for(lambda: tokens.is_dir() and any(tokens.iterdir()), process, "the first fine-tune")
    time.sleep(3)
    assert _servers(home)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP, stderr
    assert "interrupted by SIGHUP" in stderr
    assert [r.info.status for r in _job_runs(home)] == ["KILLED"]
    deadline = time.monotonic() + 15
    while _servers(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _servers(home)


def test_ctrl_c_in_a_terminal_stops_cleanly_and_resumes(tiny_bert, tmp_path, reference,
                                                        start):
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group."""
    home = tmp_path / "home"
    process = start(_command(tiny_bert, home, "--keep-candidates"))
    _wait_for(lambda: _finished(home, "candidates") >= 4, process, "the second iteration")
    assert _servers(home), "the temporary API server is running"
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)  # the group: glp and all it started in it
    _, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - sent
    print(f"exited {seconds:.1f} s after SIGINT to the group")
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert seconds < 30
    assert "interrupted by SIGINT" in stderr and "run the same command again" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr  # one line, no connection errors
    assert [r.info.status for r in _job_runs(home)] == ["KILLED"]
    assert not [r for r in _runs(home) if r.info.status == "RUNNING"]
    deadline = time.monotonic() + 15
    while _servers(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _servers(home), "glp stopped its API server on the way out"
    computed, reused = _counts(_run(tiny_bert, home, "--keep-candidates"))
    assert computed + reused == TOTAL and reused >= 3
    assert _results(home) == reference
    assert [r.info.status for r in _job_runs(home)] == ["FINISHED"]  # the same run, closed


@pytest.mark.parametrize("gap", [None, 0.1, 0.5, 1.0])
def test_ctrl_c_twice_under_timeout_still_closes_the_run(tiny_bert, tmp_path, start, gap):
    """``timeout 600 glp prune ...`` in a terminal: Ctrl-C reaches glp from the terminal and
    again from ``timeout``, which forwards it (``gap`` None); or a second Ctrl-C ``gap``
    seconds after the first. The second must not cut the first's cleanup short and leave
    the MLflow run RUNNING."""
    home = tmp_path / "home"
    command = _command(tiny_bert, home, "--keep-candidates")
    process = start(["timeout", "600", *command] if gap is None else command)
    _wait_for(lambda: _finished(home, "candidates") >= 2, process, "the second candidate")
    os.killpg(process.pid, signal.SIGINT)
    if gap is not None:
        time.sleep(gap)
        os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "interrupted by SIGINT" in stderr and "Traceback" not in stderr
    assert [r.info.status for r in _job_runs(home)] == ["KILLED"]
    assert not [r for r in _runs(home) if r.info.status == "RUNNING"]


def test_two_identical_runs_at_once_register_each_model_once(tiny_bert, tmp_path):
    """The second identical command, started while the first runs, waits for it and reuses
    its results: one MLflow job run, one registry version per final model, and the finals'
    versions agree with the aliases."""
    home = tmp_path / "home"
    command = _command(tiny_bert, home, "--seeds", "1")
    command[command.index("--epochs") + 1] = "10"  # the first still runs when the second starts
    first = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: _finished(home, "candidates") + _finished(home, "finals") >= 1
              or (home / "locks").is_dir(), first, "the first run's start")
    second = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    outputs = [job.communicate(timeout=600)[0] for job in (first, second)]
    assert [job.returncode for job in (first, second)] == [0, 0], "\n".join(outputs)
    assert "waiting for it to finish" in " ".join(outputs[1].split())
    assert _counts(outputs[1])[0] == 0  # everything reused
    tables = _tables(home)
    assert len(tables["finals"]) == 3 and len({r["cache_key"] for r in tables["finals"]}) == 3
    assert len(_job_runs(home)) == 1
    uri = f"sqlite:///{home / 'mlflow.db'}"  # both: an earlier test may set the registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    registered = [r for r in tables["finals"] if r["model_version"]]
    names = {r["registered_model"] for r in registered}
    assert len(names) == 1, [m.name for m in client.search_registered_models()]
    model = client.get_registered_model(names.pop())
    fp32 = [v for v in client.search_model_versions(f"name='{model.name}'")
            if v.tags.get("glp.precision") != "int8"]
    assert sorted(r["depth"] for r in registered) == [1, 2]  # the pruned depths
    assert len(fp32) == 2  # once each
    for row in registered:
        alias = client.get_model_version_by_alias(model.name, f"depth-{row['depth']}")
        assert str(alias.version) == str(row["model_version"])


def test_concurrent_runs_in_one_home(tiny_bert, tmp_path):
    home = tmp_path / "home"
    shared = ("--registered-model", "glp-shared")
    jobs = [subprocess.Popen(_command(tiny_bert, home, "--strategy", strategy, *shared),
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for strategy in ("greedy", "bottom")]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(outputs)
    tables = _tables(home)
    by_strategy = {s: [r for r in tables["finals"] if r["strategy"] != "unpruned"
                       and r["job_id"] in {c["job_id"] for c in tables["finals"]
                                           if c["strategy"] == s}]
                   for s in ("greedy", "bottom")}
    assert all(len(rows) == 4 for rows in by_strategy.values())  # 2 depths x 2 seeds each
    assert len(tables["candidates"]) == 5  # bottom fine-tunes no candidates
    assert len({r["job_id"] for r in tables["finals"]}) == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                          registry_uri=f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'glp-shared'")
    assert len(versions) == 8  # 2 jobs x 2 depths, fp32 and int8
    assert len({(v.tags["glp.job_id"], v.tags["glp.budget"]) for v in versions}) == 8
    assert client.get_model_version_by_alias("glp-shared", "best")
    assert not [r for r in _runs(home) if r.info.status == "RUNNING"]
