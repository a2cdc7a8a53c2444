"""Injected faults: transient ones are retried away, a permanent one fails the run cleanly
and keeps what was finished; the next run resumes from there."""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest
from mlflow.tracking import MlflowClient

from flows.prune import PruneParams, prune
from tasks.faults import InjectedFault, inject

pytestmark = pytest.mark.slow  # Prefect/MLflow flows or subprocesses: see README, Tests


def _params(model, home) -> PruneParams:
    return PruneParams(model=str(model), task="sst2", remove=2, train_limit=80, eval_limit=40,
                       epochs=1.0, max_length=16, learning_rate=1e-3, batch_size=16, seeds=1,
                       home=str(home))


def _rows(home, table):
    return ds.dataset(home / "parquet" / table).to_table().to_pylist()


@pytest.fixture(scope="module")
def clean(harness, tiny_bert, tmp_path_factory):
    home = tmp_path_factory.mktemp("clean")
    return home, prune(_params(tiny_bert, home))


def test_transient_faults_are_retried(clean, tiny_bert, tmp_path, monkeypatch):
    _, reference = clean
    # Every kind of task fails on its first call; retries=2 heals each of them (the first
    # candidate's task fails twice: at its fine-tune, then at its evaluation).
    monkeypatch.setenv("GLP_FAULTS", "fine-tune=1,evaluate=1,log=1,record=1,register=1")
    home = tmp_path / "home"
    summary = prune(_params(tiny_bert, home))
    assert summary.order == reference.order
    assert [c["value"] for c in summary.candidates] == [c["value"] for c in reference.candidates]
    assert [f["value"] for f in summary.finals] == [f["value"] for f in reference.finals]
    assert summary.computed == 8 and len(_rows(home, "candidates")) == 5
    assert sorted(summary.versions) == ["best", "best-int8", "depth-1", "depth-1-int8",
                                        "depth-2", "depth-2-int8"]


def test_a_permanent_fault_fails_the_run_and_keeps_what_finished(tiny_bert, tmp_path,
                                                                 monkeypatch, clean):
    _, reference = clean
    home = tmp_path / "home"
    # The first 4 fine-tunes succeed (the 3 first-iteration candidates and one more),
    # then fine-tuning fails for good.
    monkeypatch.setenv("GLP_FAULTS", "fine-tune=after:4")
    with pytest.raises(InjectedFault, match="injected fault at fine-tune"):
        prune(_params(tiny_bert, home))
    assert len(_rows(home, "selections")) == 1  # the finished iteration is on record
    assert len(_rows(home, "candidates")) == 3
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs(client.search_experiments()[0].experiment_id.split(),
                              filter_string="tags.`glp.kind` = 'job'")
    assert [r.info.status for r in runs] == ["FAILED"]
    # Without the fault the same run resumes: the 4 finished fine-tunes are reused.
    monkeypatch.delenv("GLP_FAULTS")
    resumed = prune(_params(tiny_bert, home))
    assert resumed.reused == 4 and resumed.computed == 4
    assert resumed.order == reference.order
    assert len(_rows(home, "candidates")) == 5 and len(_rows(home, "selections")) == 2
    assert client.get_run(resumed.parent_run_id).info.status == "FINISHED"


def test_fault_rules(monkeypatch):
    monkeypatch.setenv("GLP_FAULTS", "evaluate=2")
    for _ in range(2):
        with pytest.raises(InjectedFault):
            inject("evaluate")
    inject("evaluate")  # the third call passes
    inject("fine-tune")  # other points are untouched
    monkeypatch.setenv("GLP_FAULTS", "nope=1")
    with pytest.raises(ValueError, match="unknown point 'nope'"):
        inject("evaluate")
    monkeypatch.delenv("GLP_FAULTS")
    inject("evaluate")


def test_a_full_disk_fails_at_once_with_one_clear_error(harness, tiny_bert, tmp_path,
                                                        monkeypatch):
    """No retries (a full disk does not clear itself), no temporary folder left, the
    parent run FAILED, and what finished (the search) kept."""
    import errno

    from transformers import PreTrainedModel

    from tasks.training import NoSpace

    calls = []

    def full(self, path, *args, **kwargs):
        calls.append(path)
        (path / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    home = tmp_path / "home"
    with pytest.raises(NoSpace, match=r"no space left on the device of the run home "
                                      rf"{home} \([\d,]+ MB free; a checkpoint of this "
                                      r"model needs about \d+ MB\)"):
        prune(_params(tiny_bert, home))
    assert len(calls) == 1  # the first final model's save, tried once
    assert not list((home / "artifacts").rglob("*.tmp-*"))
    assert len(_rows(home, "selections")) == 2  # the search (no weights written) finished
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs(client.search_experiments()[0].experiment_id.split(),
                              filter_string="tags.`glp.kind` = 'job'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_full_disk_while_writing_parquet_is_not_retried(harness, tiny_bert, tmp_path,
                                                          monkeypatch):
    import errno

    import tasks.records

    calls = []

    def full(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "home"))

    monkeypatch.setattr(tasks.records.pq, "write_table", full)
    with pytest.raises(OSError, match="No space left on device"):
        prune(_params(tiny_bert, tmp_path / "home"))
    assert len(calls) == 1  # the first Parquet file (a prepared split), tried once
