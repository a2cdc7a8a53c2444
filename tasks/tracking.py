"""MLflow tracking and registry: a parent run per pruning job, child runs per candidate and
final model, and registered text-in versions (fp32 and int8) per budget.

Everything goes through ``MlflowClient`` with explicit run ids (MLflow's active run is
thread-local, and tasks may run on other threads or machines). Every write is looked up
first by its tags, so a retried task or a re-run of the same job finds its runs and
versions instead of creating second copies.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

import glp
from tasks import faults, templates

if TYPE_CHECKING:  # MLflow is imported where it is used: 0.6 s that a command pays while
    # its Prefect server starts (flows/launch.py), not before it checks its inputs.
    from mlflow.tracking import MlflowClient

JOB, CANDIDATE, FINAL = "job", "candidate", "final"
_RETRY = {"cache_policy": NO_CACHE, "retries": 2, "retry_delay_seconds": 2,
          "retry_condition_fn": faults.retry_unless_hopeless}


_READY: set[str] = set()


def _create_store_once(tracking_uri: str) -> None:
    """Create a new sqlite store under an exclusive file lock, as a copy of the migrated
    template when there is one (:mod:`tasks.templates`; 1.5 s of migrations otherwise).

    MLflow creates its tables with alembic migrations; two processes that open a new
    database at the same moment both migrate and one fails ("table _alembic_tmp_tags
    already exists"). Runs sharing a home open it one at a time; later opens are cheap.
    """
    if tracking_uri in _READY or not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    import mlflow
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    template = templates.template_path(f"mlflow-{mlflow.__version__}.db")
    with FileLock(path.with_name(f"{path.name}.lock")):
        new = not path.exists() and not templates.seed(path, template)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
        if new:
            templates.keep(path, template, empty=_without_experiments)
    _READY.add(tracking_uri)


def _without_experiments(database) -> None:
    """A new store's one row that names its home: the Default experiment, whose artifact
    location MLflow sets when it creates the store. MLflow creates it again, for the
    store's own location, when it opens a store without experiments."""
    database.execute("DELETE FROM experiment_tags")
    database.execute("DELETE FROM experiments")


def client_for(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    _create_store_once(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The experiment's id, created with its artifacts under the run home if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=Path(artifact_root).as_uri())


def _find_runs(client: MlflowClient, experiment_id: str, **tags: str) -> list:
    clauses = " and ".join(f"tags.`glp.{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment_id], filter_string=clauses, max_results=100)


def _log(client: MlflowClient, run_id: str, params: dict | None = None,
         metrics: dict | None = None, tags: dict | None = None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


@task(name="start-job-run", **_RETRY)
def start_job_run(tracking_uri: str, experiment: str, artifact_root: Path, job_id: str,
                  run_name: str, params: dict, tags: dict) -> str:
    """The job's parent run: reopened when the job ran before, created otherwise.

    Child runs a killed attempt left RUNNING are marked KILLED.
    """
    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_root)
    existing = _find_runs(client, experiment_id, job_id=job_id, kind=JOB)
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for child in _find_runs(client, experiment_id, job_id=job_id):
            if child.info.run_id != run_id and child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, status="KILLED")
        attempts = int(existing[0].data.tags.get("glp.attempts", "1")) + 1
    else:
        all_tags = {"glp.job_id": job_id, "glp.kind": JOB, "glp.version": glp.__version__,
                    **tags}
        run_id = client.create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id
        _log(client, run_id, params=params)
        attempts = 1
    client.set_tag(run_id, "glp.attempts", str(attempts))
    return run_id


@task(name="end-job-run", **_RETRY)
def end_job_run(tracking_uri: str, run_id: str, status: str, metrics: dict | None = None,
                tags: dict | None = None) -> None:
    """Close the parent run as FINISHED, FAILED or KILLED, with the summary metrics."""
    client = client_for(tracking_uri)
    _log(client, run_id, metrics=metrics, tags=tags)
    client.set_terminated(run_id, status=status)


@task(name="log-child-run", **_RETRY)
def log_child_run(tracking_uri: str, parent_run_id: str, job_id: str, kind: str, key: str,
                  run_name: str, params: dict, metrics: dict, tags: dict,
                  texts: dict[str, str] | None = None) -> str:
    """A finished child run for one candidate or final model (found again on a re-run);
    ``texts`` are small artifacts (file name -> content), such as the model's plan."""
    faults.inject("log")
    client = client_for(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    for run in _find_runs(client, experiment_id, job_id=job_id, kind=kind, key=key):
        if run.info.status == "FINISHED":
            return run.info.run_id
    all_tags = {"mlflow.parentRunId": parent_run_id, "glp.job_id": job_id, "glp.kind": kind,
                "glp.key": key, **tags}
    run_id = client.create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id
    _log(client, run_id, params=params, metrics=metrics)
    for name, text in (texts or {}).items():
        client.log_text(run_id, text, name)
    client.set_terminated(run_id, status="FINISHED")
    return run_id


@task(name="log-run-metrics", **_RETRY)
def log_run_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """Add metrics measured later (latency) to a finished run, once: a metric the run
    already has is not logged again by a re-run."""
    client = client_for(tracking_uri)
    have = client.get_run(run_id).data.metrics
    _log(client, run_id, metrics={k: v for k, v in metrics.items() if k not in have})


def _create_version(client: MlflowClient, name: str, versions: list, source: str,
                    run_id: str, tags: dict, description: str) -> str:
    """A new version of ``name`` (the registered model is created first when it has no
    versions yet); returns its number."""
    if not versions:
        try:
            client.create_registered_model(name, description=description)
        except Exception:  # created meanwhile by another run
            pass
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                          description=description)
    return str(version.version)


def _find_version(client: MlflowClient, name: str, job_id: str, key: str, value: str):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # the registered model does not exist yet
        return None, []
    for version in versions:
        if version.tags.get("glp.job_id") == job_id and version.tags.get(key) == value:
            return str(version.version), versions
    return None, versions


def text_signature(pair: bool, is_regression: bool):
    """The columns a text-in version takes and returns."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = [ColSpec("string", "text")] + ([ColSpec("string", "text_pair")] if pair else [])
    outputs = ([ColSpec("double", "value")] if is_regression
               else [ColSpec("string", "label"), ColSpec("double", "score")])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


@contextlib.contextmanager
def _without_type_hint_advice():
    """MLflow advises "add type hints to predict" whenever it loads a text-in version's
    code; the version's signature is explicit, so the advice is not shown (MLflow resets
    the warning filters, hence the display hook)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "Add type hints to the `predict` method" not in str(message):
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


TEXT_EXAMPLE = ("a gripping, beautifully acted film", "the plot never comes together")
"""The input example every text-in version carries."""


@task(name="register-onnx", **_RETRY)
def register_onnx(tracking_uri: str, run_id: str, model_dir: str, name: str, job_id: str,
                  budget: str, tags: dict, description: str, text: dict,
                  int8_folder: str | None = None) -> str:
    """Log a model directory as a text-in version in its run and register it, tagged with
    the budget (``glp.budget``, e.g. ``density-30``, ``density-30-int8``) and the precision
    (``glp.precision``: fp32, or int8 when ``int8_folder`` is given).

    The version is an MLflow pyfunc (models from code, :mod:`tasks.served_text_model`)
    holding the ONNX graph and the tokenizer (:func:`glp.deploy.export.write_text_model`,
    with ``text``'s ``labels``, ``max_length`` and ``pair``), with a signature and an input
    example: it takes a ``text`` column and returns ``label`` and ``score``, and serving it
    needs onnxruntime and tokenizers, not glp, torch or transformers. ``int8_folder`` is
    the int8 text-in folder the int8 score was measured on (:mod:`tasks.deployment`): the
    very graph that was scored is registered, its files linked, not copied, where the
    store allows. Idempotent: the version of this job and budget is returned if it exists,
    and a model an attempt logged but did not register (it died in between) is registered
    now, not logged a second time.
    """
    faults.inject("register")
    import mlflow

    client = client_for(tracking_uri)
    found, versions = _find_version(client, name, job_id, "glp.budget", budget)
    if found is not None:
        return found
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    owner = {"glp.job_id": job_id, "glp.budget": budget}
    experiment_id = client.get_run(run_id).info.experiment_id
    model_id = (_logged_before(client, experiment_id, run_id, owner)
                or _log_text_model(client, experiment_id, run_id, model_dir, int8_folder,
                                   text, owner))
    model_uri = f"models:/{model_id}"
    logged = _local_folder(model_uri)
    if logged is not None:  # one copy on disk: the checkpoint's, the scored int8 graph's
        link_duplicates(Path(int8_folder or model_dir), logged / "artifacts" / "text_model")
    precision = "int8" if int8_folder is not None else "fp32"
    return _create_version(client, name, versions, model_uri, run_id,
                           {**owner, "glp.flavor": "onnx",
                            "glp.input": "text", "glp.precision": precision, **tags},
                           description)


def _logged_before(client: MlflowClient, experiment_id: str, run_id: str,
                   owner: dict[str, str]) -> str | None:
    """The id of the model an earlier attempt logged for this version and then died before
    registering it (READY: reused); a model it left unfinished is deleted, with its files.
    """
    from mlflow.entities import LoggedModelStatus

    clauses = " AND ".join([f"source_run_id = '{run_id}'",
                            *(f"tags.`{k}` = '{v}'" for k, v in owner.items())])
    ready = None
    for model in client.search_logged_models([experiment_id], filter_string=clauses):
        if model.status == LoggedModelStatus.READY and ready is None:
            ready = model.model_id
            continue
        folder = _local_folder(f"models:/{model.model_id}")
        client.delete_logged_model(model.model_id)
        if folder is not None and folder.is_dir():
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return ready


def _log_text_model(client: MlflowClient, experiment_id: str, run_id: str, model_dir: str,
                    int8_folder: str | None, text: dict, owner: dict[str, str]) -> str:
    """Log the text-in folder of ``model_dir`` (or the scored ``int8_folder``) as a
    models-from-code pyfunc of the run, tagged with ``owner``; its id. The run is not
    reopened (``mlflow.start_run``): a process killed while a reopened run logs leaves the
    run RUNNING, and the model unfindable."""
    import shutil
    import tempfile

    from glp.deploy.export import link_or_copy, write_text_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "text_model"
        if int8_folder is not None and (Path(int8_folder) / "model.onnx").is_file():
            shutil.copytree(int8_folder, folder, copy_function=link_or_copy)
        else:
            write_text_model(model_dir, folder, labels=text.get("labels"),
                             max_length=text["max_length"], pair=bool(text.get("pair")),
                             int8=int8_folder is not None)
        plan = Path(model_dir) / "glp_plan.json"
        if plan.is_file() and not (folder / plan.name).exists():
            shutil.copy(plan, folder / plan.name)
        return _log_folder(client, experiment_id, run_id, folder, text, owner)


def _log_folder(client: MlflowClient, experiment_id: str, run_id: str, folder: Path,
                text: dict, owner: dict[str, str]) -> str:
    import mlflow
    import onnxruntime
    import pandas as pd
    import tokenizers
    from mlflow.entities import LoggedModelOutput

    from glp.deploy import text_model

    pair = bool(text.get("pair"))
    example = pd.DataFrame({"text": list(TEXT_EXAMPLE),
                            **({"text_pair": list(reversed(TEXT_EXAMPLE))} if pair else {})})
    model = mlflow.initialize_logged_model(name="model", source_run_id=run_id, tags=owner,
                                           experiment_id=experiment_id)
    with _without_type_hint_advice():
        mlflow.pyfunc.log_model(
            name="model", model_id=model.model_id,
            python_model=str(Path(__file__).with_name("served_text_model.py")),
            artifacts={"text_model": str(folder)}, code_paths=[text_model.__file__],
            signature=text_signature(pair, not text.get("labels")), input_example=example,
            pip_requirements=[f"onnxruntime=={onnxruntime.__version__}",
                              f"tokenizers=={tokenizers.__version__}"])
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def _local_folder(model_uri: str) -> Path | None:
    """The folder a logged model's files are in, when the artifact store is local."""
    from urllib.parse import unquote, urlparse
    from urllib.request import url2pathname

    try:
        import mlflow

        location = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    except Exception:  # an older store, or not a logged model
        return None
    parsed = urlparse(location)
    return Path(url2pathname(unquote(parsed.path))) if parsed.scheme in ("", "file") else None


def link_duplicates(source: Path, copy: Path) -> int:
    """Replace each file under ``copy`` that is byte-identical to the file of the same
    name under ``source`` by a hard link to it: a registered graph and the one its score
    was measured on are then one file on disk. Files are never written in place (every
    write is a new file, renamed), so a link shares nothing that later changes; deleting
    either keeps the other. Returns the bytes saved."""
    import filecmp
    import os

    saved = 0
    for path in copy.rglob("*"):
        twin = source / path.relative_to(copy)
        if not path.is_file() or path.is_symlink() or not twin.is_file():
            continue
        if os.path.samefile(path, twin) or not filecmp.cmp(path, twin, shallow=False):
            continue
        tmp = path.with_name(f".{path.name}.link")
        tmp.unlink(missing_ok=True)  # left by a process that died here
        try:
            os.link(twin, tmp)
        except OSError:
            return saved
        os.replace(tmp, path)
        saved += path.stat().st_size
    return saved


@task(name="update-aliases", **_RETRY)
def update_aliases(tracking_uri: str, name: str, proposals: dict[str, str]) -> dict[str, str]:
    """Point each alias (``best``, ``depth-4``, ...) at its proposed version, unless the
    version it points at now scored better on the same metric and the same selection rows,
    by the selection-split mean (``glp.selection_mean``; the dev set only reports, it never
    chooses).

    So ``best`` moves when a newer run registers a better model and stays when it does
    not; a run scored on other selection rows (another budget) is not comparable, and the
    newer registration takes the alias. Returns where every alias points afterwards.
    """
    client = client_for(tracking_uri)
    placed = {}
    for alias, version in proposals.items():
        new = client.get_model_version(name, version)
        try:
            current = client.get_model_version_by_alias(name, alias)
        except Exception:  # the alias does not exist yet
            current = None
        if current is not None and str(current.version) != str(version) and _scored_better(
            current.tags, new.tags
        ):
            placed[alias] = str(current.version)
            continue
        client.set_registered_model_alias(name, alias, version)
        placed[alias] = str(version)
    return placed


@task(name="drop-aliases", **_RETRY)
def drop_aliases(tracking_uri: str, name: str, aliases: list[str]) -> None:
    """Remove these aliases of ``name`` where they exist (an int8 alias whose fp32 alias
    moved to a model with no int8 graph)."""
    client = client_for(tracking_uri)
    have = set(client.get_registered_model(name).aliases)
    for alias in aliases:
        if alias in have:
            client.delete_registered_model_alias(name, alias)


def _scored_better(current: dict, new: dict) -> bool:
    """Whether the current version's selection-split mean is at least the new one's, on
    the same metric and the same selection rows (``glp.selection_fingerprint``: another
    ``--train-limit``, training file, selection fraction or split seed draws other rows,
    and means on other rows say nothing about each other)."""
    key, rows = "glp.selection_mean", "glp.selection_fingerprint"
    if (current.get("glp.metric") != new.get("glp.metric") or key not in current
            or not current.get(rows) or current.get(rows) != new.get(rows)):
        return False  # not comparable: the newer registration wins
    return float(current[key]) >= float(new.get(key, "-inf"))


@task(name="log-report", **_RETRY)
def log_report(tracking_uri: str, run_id: str, folder: Path) -> None:
    """Attach a report folder (markdown, CSV, plots) to the job's run, under ``report/``."""
    client_for(tracking_uri).log_artifacts(run_id, str(folder), artifact_path="report")
