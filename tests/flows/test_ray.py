"""The greedy search on a temporary local Ray instance, against the sequential run.

As for Dask (test_dask.py): the Ray run must find what the sequential run finds, and its
fine-tunes must really run in Ray worker processes: no fine-tune or evaluation runs in
this process (counters here stay at zero while every one is computed), and a Ray worker
setup hook records the process id of every fine-tune and evaluation its worker ran.

The local instance is the one ``RayTaskRunner`` starts itself (``--task-runner ray``)
with the runner's own ``ray.init`` arguments; the test only adds a small instance (2
CPUs, 100 MB of object store, no dashboard) and the recording hook.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
prefect_ray = pytest.importorskip(
    "prefect_ray", reason="prefect-ray is not installed: pip install -e '.[ray]'")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowFilter, FlowFilterName  # noqa: E402

import tasks.training  # noqa: E402
from flows.prune import prune  # noqa: E402
from flows.runners import make_task_runner  # noqa: E402

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests

SMALL_INSTANCE = {"num_cpus": 2, "include_dashboard": False,
                  "object_store_memory": 100 * 1024 * 1024}


def _small(init, calls: list[dict], env_vars: dict | None = None, **runtime_env):
    """``init`` (ray.init) as the runner calls it, on a small instance; each call's own
    arguments go to ``calls``; ``env_vars`` and ``runtime_env`` join the runner's."""

    def small_init(*args, **kwargs):
        calls.append({"args": args, "kwargs": copy.deepcopy(kwargs)})
        merged = copy.deepcopy(kwargs.pop("runtime_env", None) or {})
        merged["env_vars"] = {**merged.get("env_vars", {}), **(env_vars or {})}
        return init(*args, **SMALL_INSTANCE, **kwargs, runtime_env={**merged, **runtime_env})

    return small_init


# ---------------------------------------------------------------------- specs (no instance)


def test_ray_specs_make_real_ray_task_runners():
    remote = make_task_runner("ray:ray://head:10001")
    assert isinstance(remote, prefect_ray.RayTaskRunner)
    assert remote.address == "ray://head:10001"
    local = make_task_runner("ray")
    assert isinstance(local, prefect_ray.RayTaskRunner) and local.address is None
    assert "runtime_env" not in local.init_kwargs  # no flow run, so no API URL to pass on
    # The copy Prefect enters for each run keeps the settings.
    assert local.duplicate() == local and remote.duplicate() == remote
    assert not ray.is_initialized()  # making a runner starts nothing


# ---------------------------------------------------------------------- Ray against sequential

# A Ray worker setup hook (``runtime_env["worker_process_setup_hook"]``, run as each worker
# process starts): wraps glp's fine_tune and evaluate where the worker's tasks call them
# (tasks.training, the module the in-process counter patches too) to write one JSON line
# per call.
RECORDER = '''
import json, os, time


def install():
    import tasks.training as training

    def recorded(call, function):
        def run(*args, **kwargs):
            start = time.time()
            result = function(*args, **kwargs)
            record = {{"pid": os.getpid(), "call": call, "start": start, "end": time.time()}}
            with open({log!r}, "a") as out:
                out.write(json.dumps(record) + "\\n")
            return result
        return run

    training.fine_tune = recorded("fine_tune", training.fine_tune)
    training.evaluate = recorded("evaluate", training.evaluate)
'''


@pytest.fixture(scope="module")
def both_runs(harness, tiny_bert, tmp_path_factory, search_params):
    """The same search sequentially and on ``ray``, in separate homes (no shared cache)."""
    tmp = tmp_path_factory.mktemp("ray")
    log = tmp / "calls.jsonl"
    (tmp / "glp_test_ray_recorder.py").write_text(RECORDER.format(log=str(log)))
    here = {"fine_tune": 0, "evaluate": 0}  # calls in this process
    inits: list[dict] = []
    path = os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))
    small_init = _small(ray.init, inits, env_vars={"PYTHONPATH": path},
                        worker_process_setup_hook="glp_test_ray_recorder.install")

    def counting(call, function):
        def run(*args, **kwargs):
            here[call] += 1
            return function(*args, **kwargs)
        return run

    try:
        with pytest.MonkeyPatch.context() as mp:
            for call in here:  # only this process's module
                mp.setattr(tasks.training, call, counting(call, getattr(tasks.training, call)))
            started = time.perf_counter()
            sequential = prune(search_params(tiny_bert, tmp / "sequential"))
            seconds = {"sequential": time.perf_counter() - started}
            in_process_sequential = dict(here)
            mp.setattr(ray, "init", small_init)  # prefect_ray calls ray.init through the module
            started = time.perf_counter()
            on_ray = prune(search_params(tiny_bert, tmp / "ray", task_runner="ray"))
            seconds["ray"] = time.perf_counter() - started
            in_process_ray = {call: here[call] - in_process_sequential[call] for call in here}
            still_running = ray.is_initialized()
            with get_client(sync_client=True) as client:
                api_url = str(client.api_url).rstrip("/")
                subflows = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["glp-prune-ray"])))
    finally:
        if ray.is_initialized():  # the runner shuts down what it started; a failure may not
            ray.shutdown()
    print(f"\nprune wall time: {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}")
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return SimpleNamespace(tmp=tmp, sequential=sequential, ray=on_ray, calls=calls,
                           in_process_sequential=in_process_sequential,
                           in_process_ray=in_process_ray, subflows=subflows, inits=inits,
                           api_url=api_url, still_running=still_running)


def test_ray_finds_the_same_order_and_scores(both_runs, same_search):
    same_search(both_runs.sequential, both_runs.ray)


def test_ray_fine_tunes_give_the_same_weights(both_runs, same_checkpoints):
    """The scores tie often: the checkpoints themselves, within float tolerance."""
    same_checkpoints(both_runs.sequential, both_runs.tmp / "sequential", both_runs.tmp / "ray")


def test_ray_run_is_a_subflow_that_computed_the_candidates(both_runs,
                                                             computed_in_one_subflow):
    computed_in_one_subflow(both_runs.subflows, both_runs.ray)


def test_the_runner_started_a_local_instance_for_the_flow_api_and_shut_it_down(both_runs):
    (init,) = both_runs.inits  # one local instance, for the whole subflow
    assert init["args"] == ()  # no address: a new local instance
    assert init["kwargs"]["namespace"] == "prefect"
    # The workers report to the flow's API (the test harness's server), not to one of
    # their own.
    assert init["kwargs"]["runtime_env"] == {"env_vars": {"PREFECT_API_URL": both_runs.api_url}}
    assert not both_runs.still_running


def test_ray_fine_tunes_ran_in_ray_worker_processes(both_runs):
    # The counters see every fine-tune and evaluation of the sequential run (5 candidates
    # and 3 finals fine-tuned), none of the Ray run's.
    assert both_runs.in_process_sequential["fine_tune"] == 8
    assert both_runs.in_process_ray == {"fine_tune": 0, "evaluate": 0}
    calls: dict[str, list[dict]] = {"fine_tune": [], "evaluate": []}
    for record in both_runs.calls:
        calls[record["call"]].append(record)
    # The workers made every call the sequential run made here, each once: none retried.
    assert {call: len(records) for call, records in calls.items()} \
        == both_runs.in_process_sequential
    assert os.getpid() not in {record["pid"] for record in both_runs.calls}
    fine_tunes = calls["fine_tune"]
    assert len({record["pid"] for record in fine_tunes}) >= 2  # in several workers
    # ... side by side: two fine-tunes (an iteration's candidates) ran at the same time.
    assert any(a["start"] < b["end"] and b["start"] < a["end"]
               for i, a in enumerate(fine_tunes) for b in fine_tunes[i + 1:])


# ---------------------------------------------------------------------- SIGTERM


def test_sigterm_stops_a_wait_on_ray_and_reaches_the_old_handler():
    """``ray.init`` installs a SIGTERM handler that aborts the process, and ``ray.get``
    stops only for a KeyboardInterrupt. The runner gives SIGTERM back to the handler the
    process had (the CLI's, Prefect's), within seconds of the signal, and Ctrl-C stays a
    KeyboardInterrupt."""

    class Stopped(BaseException):
        pass

    def stop(signum, frame):
        raise Stopped(signum)

    old = signal.signal(signal.SIGTERM, stop)
    # Ctrl-C as in a terminal, even when the tests were started in the background with
    # SIGINT ignored (nohup, `&`).
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ray, "init", _small(ray.init, []))
            runner = make_task_runner("ray")
            with runner:  # a new local instance
                installed = signal.getsignal(signal.SIGTERM)
                # Ray's own handler (in C++: abort) is gone; ours passes SIGTERM on to stop.
                assert isinstance(installed, functools.partial) and installed.args == (stop,)
                sleep = ray.remote(lambda: time.sleep(60))
                for signum, raised in ((signal.SIGTERM, Stopped),
                                       (signal.SIGINT, KeyboardInterrupt)):
                    future = runner.future_class(task_run_id=uuid.uuid4(),
                                                 wrapped_future=sleep.remote())
                    timer = threading.Timer(2, os.kill, (os.getpid(), signum))
                    timer.start()
                    started = time.monotonic()
                    try:
                        with pytest.raises(raised) as caught:  # not TimeoutError after 30 s
                            future.result(timeout=30)
                    finally:
                        timer.cancel()  # a wait that ended early gets no stray signal later
                    assert type(caught.value) is raised
                    assert time.monotonic() - started < 15
            assert signal.getsignal(signal.SIGTERM) is stop  # given back on the way out
            assert not ray.is_initialized()
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
        if ray.is_initialized():
            ray.shutdown()
