"""Task-runner specs, and the greedy search on a local Dask cluster of two worker processes.

The Dask run must find what the sequential run finds (the fine-tunes are deterministic
on CPU for a fixed seed), and its fine-tunes must really run in the worker processes:
no fine-tune runs in this process (a counter here stays at zero while every fine-tune
is computed), and a Dask worker plugin records the process id of every task it ran.
"""

from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import dask
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.task_runners import ThreadPoolTaskRunner

import tasks.training
from flows.prune import prune
from flows.runners import (
    FORMS,
    local_worker_env,
    make_task_runner,
    parse_task_runner,
    run_on_task_runner,
)
from glp import GlpError

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests

# ---------------------------------------------------------------------- specs (no cluster)


@pytest.mark.parametrize(("spec", "normal", "workers"), [
    ("sequential", "sequential", 1),
    (None, "sequential", 1),
    ("threads:3", "threads:3", 3),
    (" Threads:2 ", "threads:2", 2),
])
def test_thread_specs(spec, normal, workers):
    assert parse_task_runner(spec).spec == normal
    runner = make_task_runner(spec) if spec else make_task_runner()
    assert isinstance(runner, ThreadPoolTaskRunner)
    assert runner._max_workers == workers


@pytest.mark.parametrize(("spec", "workers"), [("dask", 2), ("dask:1", 1), ("DASK:3", 3)])
def test_local_dask_specs(spec, workers, monkeypatch):
    from prefect_dask import DaskTaskRunner

    monkeypatch.setattr("flows.runners.cpu_cores", lambda: 4)
    runner = make_task_runner(spec)
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    kwargs = runner.cluster_kwargs
    assert kwargs["n_workers"] == workers and kwargs["processes"] is True
    assert kwargs["threads_per_worker"] == 1
    assert kwargs["env"]["OMP_NUM_THREADS"] == str(max(1, 4 // workers))
    assert "PREFECT_API_URL" not in kwargs["env"]  # outside a flow run there is none
    assert parse_task_runner(spec).spec == f"dask:{workers}"
    # The copy Prefect enters for each run (and each Dask worker) keeps the settings.
    assert runner.duplicate().cluster_kwargs == kwargs


def test_dask_address_spec():
    runner = make_task_runner("dask:tcp://10.0.0.5:8786")
    assert runner.address == "tcp://10.0.0.5:8786" and not runner.cluster_kwargs


@pytest.mark.parametrize("spec", [
    "", "gpu", "threads", "threads:0", "threads:two", "sequential:2", "dask:0", "dask:x",
    "dask:10.0.0.5:8786", "ray:10.0.0.5", "ray:ray//host", 3,
])
def test_bad_specs_name_the_valid_forms(spec):
    with pytest.raises(GlpError) as caught:
        make_task_runner(spec)
    message = str(caught.value)
    assert "\n" not in message and FORMS in message and repr(spec) in message


def test_ray_is_imported_lazily_with_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # import fails as if not installed
    with pytest.raises(GlpError, match=r"needs prefect-ray.*pip install prefect-ray"):
        make_task_runner("ray:ray://head:10001")
    parse_task_runner("ray:ray://head:10001")  # parsing needs no package


def test_sequential_runs_the_body_in_place():
    calls = []
    assert run_on_task_runner(lambda p: calls.append(p) or 42,
                              SimpleNamespace(task_runner="sequential"), "x") == 42
    assert run_on_task_runner(lambda p: 7, SimpleNamespace(), "x") == 7  # no field
    with pytest.raises(GlpError):
        run_on_task_runner(lambda p: 0, SimpleNamespace(task_runner="dask:nope"), "x")
    assert len(calls) == 1


def test_worker_env_splits_the_cores(monkeypatch):
    monkeypatch.setattr("flows.runners.cpu_cores", lambda: 2)
    assert local_worker_env(2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert local_worker_env(1)["OMP_NUM_THREADS"] == "2"
    assert local_worker_env(5)["OMP_NUM_THREADS"] == "1"


# ---------------------------------------------------------------------- Dask against sequential

# A Dask worker preload: a plugin that writes one JSON line per finished task.
RECORDER = '''
import json, os
from distributed import WorkerPlugin

LOG = {log!r}


class Recorder(WorkerPlugin):
    def transition(self, key, start, finish, **kwargs):
        if start == "executing" and finish == "memory":  # ran here (not fetched)
            with open(LOG, "a") as out:
                out.write(json.dumps({{"pid": os.getpid(), "key": str(key)}}) + "\\n")


async def dask_setup(worker):
    await worker.plugin_add(Recorder(), name="glp-test-recorder")
'''


@pytest.fixture(scope="module")
def both_runs(harness, tiny_bert, tmp_path_factory, search_params):
    """The same search sequentially and on ``dask:2``, in separate homes (no shared cache)."""
    tmp = tmp_path_factory.mktemp("dask")
    log = tmp / "tasks.jsonl"
    preload = tmp / "glp_test_recorder.py"
    preload.write_text(RECORDER.format(log=str(log)))
    here: list[int] = []
    original = tasks.training.fine_tune

    def counting(*args, **kwargs):
        here.append(os.getpid())
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.training, "fine_tune", counting)  # only this process's module
        started = time.perf_counter()
        sequential = prune(search_params(tiny_bert, tmp / "sequential"))
        seconds = {"sequential": time.perf_counter() - started}
        in_process_sequential = len(here)
        started = time.perf_counter()
        with dask.config.set({"distributed.worker.preload": [str(preload)]}):
            on_dask = prune(search_params(tiny_bert, tmp / "dask", task_runner="dask:2"))
        seconds["dask:2"] = time.perf_counter() - started
        in_process_dask = len(here) - in_process_sequential
        with get_client(sync_client=True) as client:
            subflows = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["glp-prune-dask"])))
    print(f"\nprune wall time: {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}")
    tasks_run = [json.loads(line) for line in log.read_text().splitlines()]
    return SimpleNamespace(tmp=tmp, sequential=sequential, dask=on_dask, tasks=tasks_run,
                           in_process_sequential=in_process_sequential,
                           in_process_dask=in_process_dask, subflows=subflows)


def test_dask_finds_the_same_order_and_scores(both_runs, same_search):
    same_search(both_runs.sequential, both_runs.dask)


def test_dask_fine_tunes_give_the_same_weights(both_runs, same_checkpoints):
    """The scores tie often: the checkpoints themselves, within float tolerance."""
    same_checkpoints(both_runs.sequential, both_runs.tmp / "sequential", both_runs.tmp / "dask")


def test_dask_run_is_a_subflow_that_computed_the_candidates(both_runs,
                                                             computed_in_one_subflow):
    computed_in_one_subflow(both_runs.subflows, both_runs.dask)


def test_dask_fine_tunes_ran_in_two_worker_processes(both_runs):
    # The counter sees every fine-tune of the sequential run, none of the Dask run's.
    assert both_runs.in_process_sequential == 8
    assert both_runs.in_process_dask == 0
    runs = {}
    for record in both_runs.tasks:
        runs.setdefault(record["key"].rsplit("-", 1)[0], []).append(record["pid"])
    assert len(runs["score_candidate"]) == 5 and len(runs["fine_tune_final"]) == 3
    assert len(runs["evaluate_final"]) == 6  # each final on the dev and the selection split
    pids = {pid for pids in runs.values() for pid in pids}
    assert os.getpid() not in pids
    assert len(set(runs["score_candidate"])) == 2  # the candidates ran side by side


def test_a_compression_method_runs_on_dask_as_it_does_here(harness, tiny_bert, tmp_path):
    """compress goes through the same task-runner path as prune: the teacher's fine-tune and
    truncated SVD on ``dask:2`` give the sequential run's models (scores within float
    tolerance: a worker runs torch with another thread count)."""
    from flows.compress import CompressParams, compress

    def run(home, **extra):
        return compress(CompressParams(
            model=str(tiny_bert), task="sst2", method="lowrank", ratios=(2.0,), train_limit=80,
            eval_limit=40, epochs=1.0, max_length=16, learning_rate=1e-3, batch_size=16,
            seeds=1, register_models=False, home=str(home), **extra))

    sequential = run(tmp_path / "sequential")
    on_dask = run(tmp_path / "dask", task_runner="dask:2")
    assert on_dask.job_id == sequential.job_id
    pairs = list(zip(sequential.finals, on_dask.finals, strict=True))
    assert [a["method"] for a, _ in pairs] == ["unpruned", "lowrank"]
    for here, there in pairs:
        assert here["plan"] == there["plan"]
        assert abs(here["value"] - there["value"]) < 1e-6
