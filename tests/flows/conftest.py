"""Fixtures of the flow tests, and the helpers the task-runner tests (Dask, Ray) share."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def harness():
    """A temporary Prefect API and database, one for the whole session: each start on a
    new database took about 10 s, and no test reads another's flow runs (each test's runs
    write to a home of its own)."""
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def search_params():
    """``make(model, home, **overrides)``: the tiny search the task-runner tests run.

    Two of the tiny BERT's three layers removed greedily: 3 + 2 candidate fine-tunes and
    3 final ones (depths 0, 1, 2), a second or two each. The candidates keep their weights
    (``keep_candidates``), for ``same_checkpoints`` to compare.
    """
    from flows.prune import PruneParams

    def make(model, home, **overrides) -> PruneParams:
        values = dict(model=str(model), task="sst2", remove=2, train_limit=80,
                      eval_limit=40, epochs=1.0, max_length=16, learning_rate=1e-3,
                      batch_size=16, seeds=1, register_models=False, keep_candidates=True,
                      home=str(home))
        return PruneParams(**{**values, **overrides})

    return make


@pytest.fixture(scope="session")
def same_search():
    """``check(sequential, parallel)``: the same order, scores and job, all 8 computed."""

    def check(sequential, parallel) -> None:
        assert parallel.order == sequential.order and len(parallel.order) == 2
        assert parallel.job_id == sequential.job_id  # the runner does not change the job
        assert ([(c["iteration"], c["layer"], c["value"]) for c in parallel.candidates]
                == [(c["iteration"], c["layer"], c["value"]) for c in sequential.candidates])
        assert ([(f["depth"], f["value"]) for f in parallel.finals]
                == [(f["depth"], f["value"]) for f in sequential.finals])
        assert ((parallel.computed, parallel.reused)
                == (sequential.computed, sequential.reused) == (8, 0))

    return check


@pytest.fixture(scope="session")
def same_checkpoints():
    """``check(summary, home_a, home_b)``: the summary's 8 checkpoints equal in both homes.

    The scores of so tiny a model tie often, so the tests compare the checkpoints
    themselves. Not bit for bit: a worker process runs torch with 1 thread (2 cores, 2
    workers), the test process with 2, and the summation order differs (seen: at most
    ~1e-7 apart).
    """
    import torch
    from safetensors.torch import load_file

    def check(summary, home_a: Path, home_b: Path) -> None:
        keys = [c["cache_key"] for c in summary.candidates]
        keys += [f["cache_key"] for f in summary.finals]
        assert len(set(keys)) == 8
        for key in set(keys):
            found = [next((home / "artifacts").glob(f"*/{key}/model.safetensors"))
                     for home in (home_a, home_b)]
            here, there = (load_file(path) for path in found)
            assert here.keys() == there.keys()
            for name, tensor in here.items():
                assert torch.allclose(tensor, there[name], rtol=1e-4, atol=1e-6), (key, name)

    return check


@pytest.fixture(scope="session")
def computed_in_one_subflow():
    """``check(subflows, summary)``: a parallel runner's job ran as its only subflow, to
    completion, and that subflow computed every candidate."""

    def check(subflows, summary) -> None:
        (subflow,) = subflows  # only the parallel run needed one
        assert subflow.parent_task_run_id is not None and subflow.state.is_completed()
        assert {c["flow_run_id"] for c in summary.candidates} == {str(subflow.id)}

    return check
