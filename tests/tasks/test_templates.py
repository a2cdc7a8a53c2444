"""New run homes' databases start from a migrated template (tasks.templates): MLflow's store
here; Prefect's in tests/flows/test_processes.py."""

from __future__ import annotations

import sqlite3

import mlflow
import pytest

from tasks import templates, tracking


def _experiments(uri: str) -> list[tuple[str, str, str]]:
    client = tracking.client_for(uri)
    return [(e.experiment_id, e.name, e.artifact_location) for e in client.search_experiments()]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GLP_CACHE_DIR", str(folder))
    seeded = []
    seed = templates.seed
    monkeypatch.setattr(templates, "seed", lambda db, tpl: seeded.append(seed(db, tpl))
                        or seeded[-1])
    return folder, seeded


def test_a_new_store_is_a_copy_of_the_template_and_works_as_a_new_one(cache, tmp_path,
                                                                       monkeypatch):
    folder, seeded = cache
    monkeypatch.chdir(tmp_path)  # MLflow puts the Default experiment's artifacts under cwd
    first = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    expected = _experiments(first)  # created by migrations: the template is kept
    template = folder / f"mlflow-{mlflow.__version__}.db"
    assert seeded == [False] and template.is_file()
    with sqlite3.connect(template) as db:  # nothing in it names the first home
        assert db.execute("SELECT count(*) FROM experiments").fetchone() == (0,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    second = f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    assert _experiments(second) == expected and seeded == [False, True]
    # What glp does with a store: its experiment, a run, a registered model.
    client = tracking.client_for(second)
    experiment = tracking.ensure_experiment(client, "glp", tmp_path / "b" / "mlruns")
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("glp-test")
    assert [r.info.status for r in client.search_runs([experiment])] == ["FINISHED"]
    assert [(e.name, e.artifact_location) for e in client.search_experiments()][0] == (
        "glp", (tmp_path / "b" / "mlruns").as_uri())
    assert list(folder.iterdir()) == [template]  # no partial copies left


def test_an_existing_store_is_never_replaced(cache, tmp_path):
    folder, _ = cache
    tracking.client_for(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")  # the template
    existing = tmp_path / "b" / "mlflow.db"
    existing.parent.mkdir()
    existing.write_bytes(b"")  # an empty file is a valid, empty sqlite database
    assert not templates.seed(existing, folder / f"mlflow-{mlflow.__version__}.db")
    assert existing.read_bytes() == b""


def test_an_unwritable_cache_only_means_no_template(tmp_path, monkeypatch):
    monkeypatch.setenv("GLP_CACHE_DIR", "/proc/glp-nowhere")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert [e.name for e in tracking.client_for(uri).search_experiments()] == ["Default"]
    assert not templates.template_path("x.db").parent.exists()
