"""A registration that dies part-way, then runs again, leaves what one uninterrupted
registration leaves: one logged model per version, no orphan and its files, and the
model's run as it was (a run that is reopened and never closed looks RUNNING to a
rerun, which marks it KILLED and logs the model's row again under a second run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import tasks.tracking
from tasks.tracking import register_onnx

pytestmark = pytest.mark.slow  # a real MLflow store and an ONNX export

TEXT = {"labels": ("0", "1"), "max_length": 16}


class Died(BaseException):
    """The process ends here (a kill), as far as this code can tell."""


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> Path:
    from glp.core.models import load_classifier

    folder = tmp_path_factory.mktemp("classifier")
    load_classifier(str(tiny_bert), num_labels=2, is_regression=False,
                    seed=0).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (tiny_bert / name).exists():
            shutil.copy(tiny_bert / name, folder / name)
    return folder


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "FINISHED")  # a final model's finished child run
    return uri, client, experiment, run_id


def _register(uri: str, run_id: str, model_dir: Path) -> str:
    return register_onnx.fn(uri, run_id, str(model_dir), "m", "job-1", "depth-2", tags={},
                            description="d", text=TEXT)


def _models(client: MlflowClient, experiment: str) -> list:
    return list(client.search_logged_models([experiment]))


def _dies_once(function):
    calls = []

    def wrapped(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise Died
        return function(*args, **kwargs)

    return wrapped


def test_a_death_between_logging_and_registering_leaves_one_model(store, model_dir,
                                                                   monkeypatch):
    uri, client, experiment, run_id = store
    monkeypatch.setattr(tasks.tracking, "_create_version",
                        _dies_once(tasks.tracking._create_version))
    with pytest.raises(Died):
        _register(uri, run_id, model_dir)
    version = _register(uri, run_id, model_dir)
    models = _models(client, experiment)
    assert len(models) == 1, [m.model_id for m in models]  # the first one, reused
    assert client.get_model_version("m", version).source == f"models:/{models[0].model_id}"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _register(uri, run_id, model_dir) == version  # and again: nothing new


def test_a_death_while_the_model_is_written_leaves_no_orphan(store, model_dir, monkeypatch,
                                                            tmp_path):
    uri, client, experiment, run_id = store
    monkeypatch.setattr(MlflowClient, "log_model_artifacts",
                        _dies_once(MlflowClient.log_model_artifacts))
    with pytest.raises(Died):
        _register(uri, run_id, model_dir)
    assert client.get_run(run_id).info.status == "FINISHED"  # not left RUNNING or FAILED
    version = _register(uri, run_id, model_dir)
    models = _models(client, experiment)
    assert len(models) == 1 and str(models[0].status) in ("READY", "LoggedModelStatus.READY")
    assert client.get_model_version("m", version).source == f"models:/{models[0].model_id}"
    folders = [p.name for p in (tmp_path / "mlruns").rglob("m-*") if p.is_dir()]
    assert folders == [models[0].model_id]  # the unfinished model's files are gone too
