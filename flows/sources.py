"""Where the model a method compresses comes from: one path for every method.

``--model`` is a directory, a hub id or a registry URI ``models:/NAME@alias`` (downloaded
into the run home). ``--prune-layers K`` first removes K layers by greedy layer pruning (the
``prune`` flow, as a subflow) and takes its best model of ``L - K`` layers. A model that is
fine-tuned for a task (it has a sequence-classification head) is compressed as it is; any
other (a pre-trained one, the embedded default) is fine-tuned on the task first, by the
``fine-tune-final`` task of ``glp prune``'s reference row (seed 40). Either model is also
the teacher of a method that distils.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from glp import GlpError
from glp.core.hashing import stable_hash
from tasks.registry import chosen
from tasks.training import Checkpoint


def is_fine_tuned(model_path: str) -> bool:
    """Whether a model directory holds a task model (a sequence classifier's head)."""
    import json

    config = json.loads((Path(model_path) / "config.json").read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def check_registered(uri: str, home: str | None, tracking_uri: str | None = None,
                     option: str = "--model") -> None:
    """Refuse, before anything runs or is created, a registry URI that the registry does not
    hold: a home with no registry, an unknown name, alias or version. An int8 version is
    refused later, when its files show it (:func:`download_registered`)."""
    from tasks.home import RunHome

    if "@" not in uri and uri.count("/") < 2:
        raise GlpError(f"{option} {uri}: name a version, models:/NAME@alias or "
                       "models:/NAME/VERSION")
    run_home = RunHome.resolve(home)
    if tracking_uri is None and not run_home.mlflow_db.is_file():
        raise GlpError(f"{option} {uri}: the run home {run_home.root} has no registry (no "
                       "mlflow.db); pass the --home where glp registered it, or a model "
                       "directory")
    import logging

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    client = MlflowClient(tracking_uri=tracking_uri or run_home.tracking_uri,
                          registry_uri=tracking_uri or run_home.tracking_uri)
    body = uri[len("models:/"):]
    name, _, alias = body.partition("@")
    if not alias:
        name, _, version = body.rpartition("/")
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        else:
            client.get_model_version(name, version)
        return
    except MlflowException:
        pass
    names = sorted(m.name for m in client.search_registered_models())
    if name not in names:
        known = (f"registered names: {', '.join(names[:8])}" + (" …" if len(names) > 8
                                                                  else "")
                 if names else "it holds no registered model")
        raise GlpError(f"{option} {uri}: the registry at {run_home.root} has no model "
                       f"'{name}'; {known}")
    if alias:
        aliases = sorted(client.get_registered_model(name).aliases)
        raise GlpError(f"{option} {uri}: '{name}' has no alias '{alias}'; its aliases: "
                       f"{', '.join(aliases) or 'none'}")
    raise GlpError(f"{option} {uri}: '{name}' has no version {version}")


def download_registered(uri: str, tracking_uri: str, home, option: str = "--model",
                        use: str = "compress") -> str:
    """A registered fp32 version, as a local model directory in the run home.

    ``option`` and ``use`` word the errors for the command that asked (``--model``,
    compress).
    """
    import logging

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line each

    if "@" not in uri and uri.count("/") < 2:
        raise GlpError(f"{option} {uri}: name a version, models:/NAME@alias or "
                       "models:/NAME/VERSION")
    target = home.artifacts / "registry" / stable_hash("registry", uri, tracking_uri)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        shutil.rmtree(tmp, ignore_errors=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GlpError(f"{option} {uri}: not found in the registry at {tracking_uri} "
                       f"({first[:200]})") from None
    # a text-in version's fp32 folder is also the model directory; an int8 one has only
    # the graph. (A transformers pipeline, as glp registered before: model/ + tokenizer.)
    text = local / "artifacts" / "text_model"
    model_dir = text if (text / "model.onnx").is_file() else local / "model"
    if not (model_dir / "config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        if (text / "model.onnx").is_file():
            raise GlpError(f"{option} {uri} is an int8 version (a quantised graph, no "
                           f"weights to {use}); give its fp32 version (the alias without "
                           "-int8) or a model directory")
        raise GlpError(f"{option} {uri}: the version holds no model directory")
    tokenizer = local / "components" / "tokenizer"
    if tokenizer.is_dir():
        for file in tokenizer.iterdir():
            shutil.copy(file, model_dir / file.name)
    shutil.rmtree(target, ignore_errors=True)
    model_dir.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def input_checkpoint(path: str, fingerprint: str, device: str) -> Checkpoint:
    """The given fine-tuned model as a checkpoint (nothing computed here)."""
    from transformers import AutoConfig

    from glp.core.anatomy import kept_layers, removed_layers

    config = AutoConfig.from_pretrained(path)
    return Checkpoint(key=stable_hash("input", fingerprint), path=path, base_path=path,
                      removed=tuple(removed_layers(config)), kept=tuple(kept_layers(config)),
                      seed=0, steps=0, examples=0, seconds=0.0, final_loss=0.0,
                      diverged=False, device=device, flow_run_id=None)


def _prune_first(params) -> str:
    """Greedy layer pruning of ``--model`` by ``--prune-layers`` layers (the prune flow, as
    a subflow, cached as usual); the model directory of its best seed at that depth."""
    from flows.params import PruneParams
    from flows.prune import prune

    fields = set(PruneParams.model_fields)
    values = {k: v for k, v in params.model_dump(exclude_unset=True).items() if k in fields}
    values.update(strategies=("greedy",), remove=params.prune_layers,
                  registered_model=None, register_models=params.register_models)
    summary = prune(PruneParams(**values))
    rows = [r for r in summary.finals if r["strategy"] == "greedy" and not r["diverged"]
            and r["depth"] == summary.num_layers - params.prune_layers]
    if not rows:
        raise GlpError(f"--prune-layers {params.prune_layers}: greedy layer pruning gave no "
                       "model of that depth that did not diverge")
    return chosen(rows)["model_dir"]


def resolve_model(params):
    """``params`` with ``--model`` as a local directory: a registry URI downloaded, and with
    ``--prune-layers`` the greedy-pruned model (``source_model`` keeps what was typed)."""
    if params.model and params.model.startswith("models:/"):
        from tasks.home import RunHome

        home = RunHome.resolve(params.home).create()
        local = download_registered(params.model, params.tracking_uri or home.tracking_uri,
                                    home)
        params = params.model_copy(update={"model": local, "source_model": params.model})
    if getattr(params, "prune_layers", 0):
        params = params.model_copy(update={"model": _prune_first(params),
                                           "source_model": params.source_model or params.model})
    return params


def registry_name(params, task: str, method, config) -> str:
    """``glp-<model>-<task>-<method><suffix>`` (``-fisher``, ``-linear``); for a registry
    input, the input's name and alias instead of the model (``glp-…-greedy-depth-4-lowrank``)."""
    from flows.params import model_slug

    name = method.name + (method.suffix(config) if method.suffix else "")
    source = params.source_model or params.model
    if source and source.startswith("models:/"):
        stem = model_slug(source[len("models:/"):].replace("@", "-").replace("/", "-v"))
        return f"{stem}-{name}"
    pruned = f"-greedy{params.prune_layers}" if params.prune_layers else ""
    return f"glp-{model_slug(source or 'all-MiniLM-L6-v2')}-{task}{pruned}-{name}"
