"""prefect.yaml on a real local Prefect server: deployed, triggered by hand, run by a worker.

Everything runs in subprocesses, as in ``glp serve``: a server on a free loopback port
with its home in a temporary folder, ``prefect deploy --all`` from the repository root,
the trigger command that ``glp serve`` prints, and a process worker that polls once and
runs the tiny BERT job. Every subprocess is stopped in ``finally``.
"""

from __future__ import annotations

import json
import shlex
import socket
import time
import uuid

import pyarrow.dataset as ds
import pytest
from mlflow.tracking import MlflowClient

from flows import serve
from glp import GlpError
from tasks.home import RunHome

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests

RUN_TIMEOUT = 240  # seconds for the flow run, from trigger to a final state
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _deployment(api: str, name: str) -> dict:
    with serve.prefect_client(api) as client:
        return client.read_deployment_by_name(name).model_dump(mode="json")


def _flow_run(api: str, run_id: str) -> dict:
    with serve.prefect_client(api) as client:
        return client.read_flow_run(run_id).model_dump(mode="json")


def _flow_runs_named(api: str, name: str) -> list[dict]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with serve.prefect_client(api) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[name])))
    return [run.model_dump(mode="json") for run in runs]


def _cron(deployment: dict) -> list[tuple[str, str, bool]]:
    return [(s["schedule"].get("cron"), s["schedule"].get("timezone"), s["active"])
            for s in deployment["schedules"]]


def _wait_for_run(api: str, run_id: str, worker) -> dict:
    """The flow run once it reaches a final state (or the worker gave up, or time ran out)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    worker_done_at = None
    while True:
        run = _flow_run(api, run_id)
        if run["state_type"] in FINAL_STATES or time.monotonic() > deadline:
            return run
        if worker.poll() is not None:  # --run-once: it exits when its runs end
            worker_done_at = worker_done_at or time.monotonic()
            if time.monotonic() - worker_done_at > 15:
                return run
        time.sleep(1.0)


def test_prune_deployment_runs_on_a_process_worker(tiny_bert, tmp_path):
    home = RunHome(tmp_path / "home").create()
    logs = tmp_path / "logs"
    port = serve.free_port()
    api = serve.api_url("127.0.0.1", port)
    env = serve.prefect_environment(home, api, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                                    PREFECT_LOGGING_LEVEL="INFO")
    params = dict(model=str(tiny_bert), task="sst2", remove=1, train_limit=80, eval_limit=40,
                  epochs=1.0, max_length=16, learning_rate=1e-3, batch_size=16, seeds=1,
                  home=str(home.root), register_models=False)
    server = worker = None
    run: dict = {}
    try:
        server = serve.start_server(home, port, env=env, log=logs / "server.log", ui=False)
        serve.wait_healthy(api, timeout=120, process=server, log=logs / "server.log")
        assert serve.ensure_work_pool(api, env) is True
        assert serve.ensure_work_pool(api, env) is False  # already there: left alone
        serve.deploy_all(env)

        # Both deployments, with prefect.yaml's schedules, parameters and pull step.
        prune = _deployment(api, serve.PRUNE_DEPLOYMENT)
        compare = _deployment(api, serve.COMPARE_DEPLOYMENT)
        assert _cron(prune) == [("0 2 * * *", "UTC", True)]
        assert _cron(compare) == [("0 3 * * 0", "UTC", True)]
        assert prune["work_pool_name"] == compare["work_pool_name"] == serve.DEFAULT_POOL
        assert prune["entrypoint"] == "flows/prune.py:prune"
        assert prune["parameters"]["params"]["train_limit"] == 2000
        assert compare["parameters"]["params"]["strategies"] == ["greedy", "top", "bottom",
                                                                   "random"]
        assert prune["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {
            "directory": str(serve.REPO_ROOT)}}]

        # Trigger it by hand with the command `glp serve` prints, on the tiny model.
        command = shlex.split(serve.trigger_command(serve.PRUNE_DEPLOYMENT, params))
        assert command[:3] == ["prefect", "deployment", "run"]
        name = f"test-{uuid.uuid4().hex[:8]}"
        serve.run_prefect([*command[1:], "--flow-run-name", name], env)
        runs = _flow_runs_named(api, name)
        assert len(runs) == 1 and runs[0]["parameters"] == {"params": params}

        worker = serve.start_worker(env, run_once=True, log=logs / "worker.log")
        run = _wait_for_run(api, runs[0]["id"], worker)
        assert run["state_type"] == "COMPLETED", run["state"]
    except BaseException:
        for log in ("server.log", "worker.log"):
            print(f"----- {log} (last lines)\n{serve.tail(logs / log, 80)}")
        print(f"----- flow run state: {run.get('state')}")
        raise
    finally:
        serve.stop_process(worker)
        serve.stop_process(server)
    assert worker.returncode is not None and server.returncode is not None

    # The results landed in the run's home: Parquet for one job, and its MLflow runs.
    finals = ds.dataset(home.parquet / "finals").to_table().to_pylist()
    jobs = {row["job_id"] for row in finals}
    assert len(jobs) == 1 and [p.name for p in (home.parquet / "finals").iterdir()] == [*jobs]
    assert sorted(row["depth"] for row in finals) == [2, 3]  # unpruned and one layer removed
    candidates = ds.dataset(home.parquet / "candidates").to_table().to_pylist()
    assert len(candidates) == 3 and {row["job_id"] for row in candidates} == jobs
    parent = MlflowClient(home.tracking_uri).get_run(finals[0]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["glp.job_id"] == jobs.pop()


def test_serve_refuses_a_non_loopback_host_and_a_busy_port(tmp_path):
    with pytest.raises(GlpError, match="0.0.0.0.*no authentication"):
        serve.serve(home=tmp_path, host="0.0.0.0")
    serve.check_host("0.0.0.0", allow_remote=True)  # allowed explicitly
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(GlpError, match=f"port {port} on 127.0.0.1 is in use"):
            serve.serve(home=tmp_path, port=port)


def test_trigger_command_passes_the_whole_params_object():
    command = shlex.split(serve.trigger_command(api="http://127.0.0.1:4200/api"))
    assert command[:5] == ["PREFECT_API_URL=http://127.0.0.1:4200/api", "prefect",
                           "deployment", "run", "glp-prune/glp-prune-nightly"]
    name, value = command[-1].split("=", 1)
    assert command[-2:-1] == ["--param"] and name == "params"
    assert json.loads(value) == serve.DEMO_PARAMS
