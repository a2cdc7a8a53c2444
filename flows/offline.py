"""``glp compress --method lowrank|autoencoder``: offline compression of a fine-tuned model.

The input is ``--model``: a fine-tuned model directory (a glp checkpoint, layer-pruned or
not), a registry URI ``models:/NAME@alias`` (downloaded into the run home), or a model
with no task head (a pre-trained one, the embedded default), which is fine-tuned first
(the ``fine-tune-final`` task shared with ``glp prune``'s reference row).
``--prune-layers K`` runs greedy layer pruning first (the ``glp prune`` flow, as a
subflow, with the same budget) and compresses its best model of ``L - K`` layers:
layers, then ranks, one plan.

Per ratio (and seed, for the autoencoder): ``compress-offline`` (cached), then
``evaluate-final`` on the dev set (the report) and the selection split (which chooses the
registered seed and ``best``); the input model is evaluated the same way as the
reference. Rows go to ``parquet/finals/`` (``method``, ``plan``, ``parameters``,
``target_ratio``, ``stored_bytes``, ``model_dir``), every model is logged in MLflow and
registered as ONNX with the alias ``ratio-10`` (and ``best``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from flows.job import Job, _finite
from glp import GlpError
from glp.core.checkpoint import read_plan, stored_bytes
from glp.core.hashing import stable_hash
from glp.core.plan import EMBEDDINGS, OFFLINE_ROLES, Plan, density_of
from glp.core.provenance import code_fingerprint
from glp.methods.names import REFERENCE
from tasks.offline import CODE as OFFLINE_CODE
from tasks.offline import OFFLINE_METHODS, OfflineRequest, compress_offline
from tasks.records import final_row, written
from tasks.registry import Registration, chosen, register_all, registrations
from tasks.tracking import FINAL, end_job_run, log_child_run, register_onnx
from tasks.training import Checkpoint

INPUT = "input"
"""The strategy of the row that scores the model given to compress, as it came."""


def ratio_label(ratio: float) -> str:
    """The budget's registry alias: ``ratio-10``, ``ratio-2p5`` (no dots in aliases)."""
    return f"ratio-{ratio:g}".replace(".", "p")


def parse_modules(values) -> tuple[str, ...]:
    """``--modules`` as given (names, comma lists, ``all``), checked, in the plan's order."""
    names: list[str] = []
    for value in values:
        names += [v.strip() for v in str(value).split(",") if v.strip()]
    if "all" in names:
        return OFFLINE_ROLES
    bad = [n for n in names if n not in OFFLINE_ROLES]
    if bad or not names:
        raise GlpError(f"--modules {','.join(bad or names) or repr('')}: choose from "
                       f"{', '.join(OFFLINE_ROLES)} or all (comma-separated)")
    return tuple(r for r in OFFLINE_ROLES if r in names)


MLPRUNING_ONLY = ("final_epochs", "block_size", "block_density", "block_epochs", "mask_lr")
GRAIN_ONLY = ("grain_start", "grain_end", "ema", "head_regulariser", "kd_weight",
              "hard_weight", "hidden_weight", "embedding_rank")
WIDTH_ONLY = ("densities", "pruning_epochs", "temperature", *MLPRUNING_ONLY, *GRAIN_ONLY)
OFFLINE_ONLY = ("ratios", "modules", "fisher", "decoder", "ae_epochs", "ae_batch_size",
                "ae_eval_every", "prune_layers")


def _option(name: str) -> str:
    return "--" + {"densities": "density", "ratios": "ratio"}.get(name, name).replace("_", "-")


def check_unused(params, offline: bool) -> None:
    """Refuse an option the chosen method does not use (it would be silently ignored)."""
    fields = type(params).model_fields
    if offline:
        unused = {name: "a width-method" for name in WIDTH_ONLY}
    else:
        unused = {name: "an offline-method" for name in OFFLINE_ONLY}
        other = GRAIN_ONLY if params.method != "grain" else MLPRUNING_ONLY
        unused |= {name: ("a GRAIN" if params.method != "grain" else "an MLPruning")
                   for name in other}
    for name, kind in unused.items():
        value, default = getattr(params, name), fields[name].default
        if name == "modules":
            value, default = parse_modules(value), parse_modules(default)
        if value != default:
            raise GlpError(f"{_option(name)} is {kind} option; --method "
                           f"{params.method} does not use it")


def check_offline(params) -> list[dict]:
    """The method's settings per ratio, or a GlpError naming the option."""
    from tasks.offline import OfflineConfig

    check_unused(params, offline=True)
    modules = parse_modules(params.modules)
    labels = [ratio_label(r) for r in params.ratios]
    if len(set(labels)) != len(labels):
        raise GlpError(f"--ratio {' '.join(f'{r:g}' for r in params.ratios)}: each ratio "
                       "may be given once")
    for ratio in params.ratios:
        if not ratio > 1:
            raise GlpError(f"--ratio {ratio:g}: a compression ratio must be > 1 (10 keeps "
                           "a tenth of each compressed module type)")
    if params.method == "autoencoder":
        from glp.core.codes import DECODERS

        if params.decoder not in DECODERS:
            raise GlpError(f"--decoder {params.decoder!r}: choose one of {', '.join(DECODERS)}")
    elif params.decoder != "nonlinear":
        raise GlpError(f"--decoder {params.decoder}: an autoencoder option (lowrank has "
                       "--fisher)")
    if params.method != "lowrank" and params.fisher:
        raise GlpError("--fisher is a lowrank option (Fisher-weighted SVD)")
    configs = []
    for ratio in params.ratios:
        config = OfflineConfig(ratio=ratio, modules=modules, fisher=params.fisher,
                               decoder=params.decoder, epochs=params.ae_epochs,
                               batch_size=params.ae_batch_size,
                               eval_every=params.ae_eval_every)
        values = dict(config.__dict__)
        values["modules"] = list(modules)
        values.pop("extra")
        if params.method == "lowrank":
            for name in ("decoder", "epochs", "batch_size", "eval_every"):
                values.pop(name)
        else:
            values.pop("fisher")
            values.pop("fisher_examples")
        configs.append(values)
    return configs


ATTENTION_ROLES = ("query", "key", "value", "output")


def check_input_plan(plan, modules) -> None:
    """Refuse what offline compression cannot do to a compressed input: matrices already
    factorised or coded, and the attention matrices of a layer cut inside its heads."""
    if plan.ranks or plan.coded:
        done = sorted({k.partition(".")[2] or k for k in (*plan.ranks, *plan.coded)})
        raise GlpError(f"--model: this model already has factorised matrices "
                       f"({', '.join(done)}); compress a model without (for GRAIN, "
                       "--embedding-rank 0 keeps the embeddings whole)")
    attention = [m for m in modules if m in ATTENTION_ROLES]
    if (plan.qk or plan.vo) and attention:
        raise GlpError(f"--modules {','.join(attention)}: this model was pruned inside its "
                       "attention heads (GRAIN), whose matrices have per-head widths; "
                       "compress its other matrices, e.g. --modules ffn_in,ffn_out")


def check_sizes(model_path: str, params, configs: list[dict]) -> None:
    """Every ratio leaves every compressed matrix something (checked on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from glp.core.factors import matrices
    from glp.core.surgery import apply_plan
    from glp.methods.autoencoder import AutoencoderConfig, latent_size
    from glp.methods.lowrank import ranks_for_ratio

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    plan = read_plan(model_path)
    if plan is not None:
        check_input_plan(plan, configs[0]["modules"])
    if plan is not None and not plan.is_layers_only:  # a width-pruned input: its widths
        apply_plan(model, plan, factor=None)
    for values in configs:
        if params.method == "lowrank":
            ranks_for_ratio(model, values["modules"], values["ratio"])
            continue
        ae = AutoencoderConfig(ratio=values["ratio"], decoder=values["decoder"])
        for role in values["modules"]:
            found = matrices(model, [role]).values()
            rows = sum(m.weight.shape[0] for m in found)
            latent_size(rows, next(iter(found)).weight.shape[1], ae)


def is_fine_tuned(model_path: str) -> bool:
    """Whether a model directory holds a task model (a sequence classifier's head)."""
    import json

    config = json.loads((Path(model_path) / "config.json").read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def download_registered(uri: str, tracking_uri: str, home, option: str = "--model",
                        use: str = "compress") -> str:
    """A registered transformers version, as a local model directory in the run home.

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
    if (local / "onnx").is_dir() or any(local.glob("*.onnx")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise GlpError(f"{option} {uri} is an ONNX version; {use} its transformers twin "
                       "(the registered name without -onnx) or a model directory")
    model_dir = local / "model"
    if not (model_dir / "config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise GlpError(f"{option} {uri}: the version holds no transformers model")
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


def run_offline(params, started: float, summary_type):
    """The offline flow body (called by ``flows.compress`` for an offline method)."""
    configs = check_offline(params)
    if params.model and params.model.startswith("models:/"):
        from tasks.home import RunHome

        home = RunHome.resolve(params.home).create()
        local = download_registered(params.model, params.tracking_uri or home.tracking_uri,
                                    home)
        params = params.model_copy(update={"model": local, "source_model": params.model})
    if params.prune_layers:
        params = params.model_copy(update={"model": _prune_first(params),
                                           "source_model": params.source_model or params.model})
    job = Job(params, [])
    check_sizes(job.model_path, params, configs)
    data = job.data
    fine_tune_first = not is_fine_tuned(job.model_path)
    job_id = job.identity("compress-offline", params.method, configs, fine_tune_first,
                          code_fingerprint(OFFLINE_CODE))
    name = params.registered_model or registry_name(params, data.task)
    job.start(job_id, f"{params.method}-{job.slug}-{data.task}",
              tags={"glp.method": params.method, "glp.strategy": params.method})
    try:
        if fine_tune_first:  # a pre-trained model: fine-tune it on the task first
            reference = job.finals([(REFERENCE, "", job.num_layers, ())])
            source = next(r for r in reference if r["seed"] == job.seeds[0])["_checkpoint"]
        else:
            source = input_checkpoint(job.model_path, job.model_fp, job.device)
            reference = [_input_row(job, source)]
        rows = _compressed(job, params, configs, source)
        job.time_budgets(source, [r for r in reference if r["cache_key"] == source.key],
                         rows, "target_ratio")
        versions = _register(job, name, rows) if params.register_models else {}
        job.write_finals(reference + rows)
        seconds = round(time.perf_counter() - started, 1)
        end_job_run(job.tracking_uri, job.parent_run_id, "FINISHED",
                    metrics={"compressions_computed": job.counts["computed"],
                             "compressions_reused": job.counts["reused"], "seconds": seconds})
    except BaseException as exc:
        job.abort(exc)
        raise
    return summary_type(
        job_id=job_id, parent_run_id=job.parent_run_id, method=params.method, task=data.task,
        metric=data.metric, num_layers=job.num_layers,
        finals=[written(r) for r in reference + rows],
        registered_model=name if versions else None, versions=versions,
        computed=job.counts["computed"], reused=job.counts["reused"],
        seconds=round(time.perf_counter() - started, 1), home=str(job.home.root),
        tracking_uri=job.tracking_uri)


def registry_name(params, task: str) -> str:
    """``glp-<model>-<task>-<method>[-fisher|-linear]``; for a registry input, the input's
    name and alias instead of the model (``glp-…-greedy-depth-4-lowrank``)."""
    from flows.job import model_slug

    method = params.method + ("-fisher" if params.fisher else "") + (
        "-linear" if params.method == "autoencoder" and params.decoder == "linear" else "")
    source = params.source_model or params.model
    if source and source.startswith("models:/"):
        stem = model_slug(source[len("models:/"):].replace("@", "-").replace("/", "-v"))
        return f"{stem}-{method}"
    pruned = f"-greedy{params.prune_layers}" if params.prune_layers else ""
    return f"glp-{model_slug(source or 'all-MiniLM-L6-v2')}-{task}{pruned}-{method}"


def _prune_first(params) -> str:
    """Greedy layer pruning of ``--model`` by ``--prune-layers`` layers (the prune flow, as
    a subflow, cached as usual); the model directory of its best seed at that depth."""
    from flows.job import PruneParams
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


def _input_row(job: Job, checkpoint: Checkpoint) -> dict:
    evaluation, selection = (
        job._evaluate_final.submit(checkpoint, job.data, split, job.finetune, job.home,
                                   job.device).result() for split in ("dev", "selection"))
    return _row(job, INPUT, "", INPUT, checkpoint, evaluation, selection,
                read_plan(checkpoint.path) or _layers_plan(checkpoint), None, "input")


def _layers_plan(checkpoint: Checkpoint) -> Plan:
    return Plan.layers(len(checkpoint.kept) + len(checkpoint.removed), checkpoint.removed)


def _row(job: Job, strategy: str, variant: str, method: str, checkpoint: Checkpoint,
         evaluation, selection, plan: Plan, ratio: float | None, run_name: str,
         params: dict | None = None) -> dict:
    diverged = checkpoint.diverged or evaluation.diverged or selection.diverged
    counts = plan.parameter_counts(job.base_config)
    encoder_density = density_of(counts)
    stored = stored_bytes(checkpoint.path) if checkpoint.path else None
    run_id = log_child_run(
        job.tracking_uri, job.parent_run_id, job.job_id, FINAL, checkpoint.key, run_name,
        params={"seed": checkpoint.seed, "device": checkpoint.device, "plan_kind": plan.kind,
                **({"ratio": ratio} if ratio is not None else {}), **(params or {})},
        metrics={**_finite(evaluation.metrics),
                 **{f"selection_{k}": v for k, v in _finite(selection.metrics).items()},
                 "parameters": counts["parameters"], "encoder_density": encoder_density,
                 "compress_seconds": checkpoint.seconds,
                 **({"stored_bytes": stored} if stored else {})},
        tags={**job.common_tags, "glp.diverged": str(diverged).lower(),
              "glp.plan_key": plan.key},
        texts={"plan.json": plan.to_json()})
    who = {"job_id": job.job_id, "strategy": strategy, "variant": variant,
           "model": getattr(job.params, "source_model", None) or job.params.model,
           "task": job.data.task,
           "method": method}
    return final_row(
        who, run_id=run_id, parent_run_id=job.parent_run_id, checkpoint=checkpoint,
        evaluation=evaluation, selection=selection, diverged=diverged, plan=plan,
        parameters=counts["parameters"] - counts["zeroed"], encoder_density=encoder_density,
        train_examples=job.data.sizes["train"], reused=checkpoint.flow_run_id != job.flow_run_id,
        target_ratio=ratio, stored_bytes=stored)


def _variant(params, ratio: float) -> str:
    kind = ("fisher" if params.fisher else "svd") if params.method == "lowrank" else params.decoder
    return f"{kind}-{ratio_label(ratio)}"


def _compressed(job: Job, params, configs: list[dict], source: Checkpoint) -> list[dict]:
    from tasks.compression import not_evaluated

    task = compress_offline.with_options(result_storage=job.home.results)
    seeds = job.seeds if params.method == "autoencoder" else job.seeds[:1]
    handle = job.reporter.begin("finals", "compressed models", len(configs) * len(seeds))
    futures = {}
    for values in configs:
        for seed in seeds:
            request = OfflineRequest(model=source, data=job.data, config=job.finetune,
                                     method=params.method, method_config=values, seed=seed,
                                     home=job.home, device=job.device)
            futures[values["ratio"], seed] = task.submit(request)
    rows = []
    for count, ((ratio, seed), future) in enumerate(futures.items()):
        compressed = future.result()
        checkpoint = compressed.checkpoint
        job._count(checkpoint)
        if checkpoint.diverged or checkpoint.path is None:
            evaluation, selection = (not_evaluated(checkpoint, job.data, split)
                                     for split in ("dev", "selection"))
        else:
            evaluation, selection = (
                job._evaluate_final.submit(checkpoint, job.data, split, job.finetune,
                                           job.home, job.device).result()
                for split in ("dev", "selection"))
        variant = _variant(params, ratio)
        rows.append(_row(job, params.method, variant, params.method, checkpoint, evaluation,
                         selection, compressed.plan_object, ratio,
                         f"{params.method}-{variant}-seed{seed}",
                         params={"modules": ",".join(params_modules(compressed))}))
        job.reporter.update(handle, count + 1)
    job.reporter.end(handle)
    return rows


def params_modules(compressed) -> list[str]:
    plan = compressed.plan_object
    roles = {k.partition(".")[2] or k for k in plan.ranks} | set(plan.coded)
    return [r for r in OFFLINE_ROLES if r in roles or (r == EMBEDDINGS and r in plan.ranks)]


def _register(job: Job, name: str, rows: list[dict]) -> dict[str, str]:
    """One ONNX version per ratio (aliases ``ratio-R`` and ``best``), by the rule of
    :mod:`tasks.registry`: chosen by the selection split, never diverged."""

    def ratio_of(row: dict) -> float | None:
        return row.get("target_ratio")

    def register(registration: Registration) -> str:
        chosen = registration.chosen
        return register_onnx(
            job.tracking_uri, chosen["run_id"], chosen["model_dir"], name, job.job_id,
            registration.alias,
            tags={**job.common_tags, **registration.score_tags(), **job.version_tags(),
                  "glp.method": chosen["method"], "glp.ratio": f"{registration.group:g}",
                  "glp.parameters": str(chosen["parameters"]),
                  "glp.stored_bytes": str(chosen["stored_bytes"]),
                  "glp.plan_key": Plan.from_json(chosen["plan"]).key},
            description=(f"{getattr(job.params, 'source_model', None) or job.params.model} "
                         f"compressed {how(chosen['method'], chosen['variant'])} on "
                         f"{job.data.task}; dev {job.data.metric} {chosen['value']:.4f} "
                         f"(seed {chosen['seed']}, chosen by the selection split); ONNX"))

    def how(method: str, variant: str) -> str:
        if "+" not in method:
            return f"offline by {method} ({variant}), no fine-tuning,"
        return f"by {method} ({variant}; its last, offline step not fine-tuned)"

    plan = registrations(rows, ratio_of, ratio_label)
    return register_all(job.tracking_uri, name, plan, register, rows, ratio_of)


__all__ = ["INPUT", "OFFLINE_METHODS", "check_offline", "parse_modules", "ratio_label",
           "run_offline"]
