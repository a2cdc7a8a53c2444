"""Parquet audit tables: candidates, selections, finals and zero-shot scores.

Layout: ``<home>/parquet/<table>/<job_id>/<part>.parquet``. Every row also carries its
``job_id``, so ``pyarrow.dataset.dataset("<home>/parquet/candidates")`` reads all jobs
(the job folder is deliberately not a ``key=value`` partition: a partition column that
is also stored in the file breaks pandas' reader). A part is written to a temporary
file and renamed, and a re-run of the same job rewrites the same parts: rows are
replaced, never duplicated, and a reader never sees a half-written file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from glp.methods import BUDGETS
from tasks import faults

_LAYERS = pa.list_(pa.int64())
# Column groups the tables share (each table lists them in the same place).
_WHO = [("strategy", pa.string()), ("variant", pa.string()), ("model", pa.string()),
        ("task", pa.string())]
# value is NaN and diverged true for a fine-tune whose loss or metric was not finite.
_SCORED = [("metric", pa.string()), ("value", pa.float64()), ("diverged", pa.bool_()),
           ("metrics_json", pa.string())]
_COST = [("train_examples", pa.int64()), ("eval_examples", pa.int64()),
         ("fine_tune_seconds", pa.float64()), ("eval_seconds", pa.float64())]
_CACHE = [("device", pa.string()), ("cache_key", pa.string()), ("reused", pa.bool_())]
_RECORDED = ("recorded_at", pa.timestamp("us", tz="UTC"))

CANDIDATES = pa.schema([
    ("job_id", pa.string()),
    ("run_id", pa.string()),
    ("parent_run_id", pa.string()),
    ("flow_run_id", pa.string()),
    *_WHO,
    ("iteration", pa.int64()),
    ("layer", pa.int64()),
    ("removed", _LAYERS),
    ("depth", pa.int64()),
    *_SCORED,
    ("seed", pa.int64()),
    ("budget", pa.float64()),  # share of the fine-tune budget (halving, warm: below 1)
    *_COST,
    *_CACHE,
    _RECORDED,
])

SELECTIONS = pa.schema([
    ("job_id", pa.string()),
    ("run_id", pa.string()),
    *_WHO,
    ("iteration", pa.int64()),
    ("layer", pa.int64()),
    ("order", _LAYERS),
    ("depth", pa.int64()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("candidates", pa.int64()),
    ("cache_key", pa.string()),
    _RECORDED,
])

FINALS = pa.schema([
    ("job_id", pa.string()),
    ("run_id", pa.string()),
    ("parent_run_id", pa.string()),
    *_WHO,
    ("depth", pa.int64()),
    ("removed", _LAYERS),
    ("seed", pa.int64()),
    *_SCORED,
    ("selection_value", pa.float64()),  # chooses the registered seed and `best`
    ("int8_value", pa.float64()),  # dev score as deployed: ONNX int8, text in
    ("int8_dir", pa.string()),  # that int8 text-in folder (glp.deploy.text_model.TextModel)
    ("method", pa.string()),  # layers, mlpruning, ... (unpruned for the reference)
    ("distilled", pa.bool_()),  # fine-tuned with distillation from the unpruned model
    ("plan", pa.string()),  # the compression plan as JSON (glp.core.plan.Plan)
    ("parameters", pa.int64()),  # non-zero parameters of the whole model
    ("encoder_density", pa.float64()),  # fraction of the base encoder's weights kept
    # the size asked for, by budget (glp.methods.BUDGETS): target_density (a fraction of
    # the weights), target_ratio (a compression ratio), target_constraint (a fraction of
    # the multiply-accumulates)
    *((f"target_{budget}", pa.float64()) for budget in BUDGETS),
    # the model's whole training on the task's data, its teacher's and its source's
    # included: epochs (rows seen over the training split's rows) and optimizer steps;
    # null when not known (a model given already fine-tuned)
    ("train_epochs", pa.float64()),
    ("train_steps", pa.int64()),
    ("stored_bytes", pa.int64()),  # the weights on disk (safetensors, codes included)
    ("model_dir", pa.string()),  # the saved model: glp.load_pretrained(model_dir)
    *_COST,
    ("latency_ms", pa.float64()),  # PyTorch, CPU, batch ``latency_batch`` (32)
    ("latency_batch", pa.int64()),
    ("latency_b1_ms", pa.float64()),  # compare --methods: PyTorch at batch 1, and ...
    ("onnx_b1_ms", pa.float64()),  # ... onnxruntime fp32 and dynamic int8 at batch 1 and 32
    ("onnx_b32_ms", pa.float64()),
    ("int8_b1_ms", pa.float64()),
    ("int8_b32_ms", pa.float64()),
    *_CACHE,
    ("registered_model", pa.string()),
    ("model_version", pa.string()),  # fp32 ONNX, text in
    ("int8_model_version", pa.string()),  # its int8 graph, text in (aliases ...-int8)
    _RECORDED,
])

# Zero-shot layer scores (block influence, angular distance): what the zero-shot
# strategies and greedy's pre-filter decided from.
SCORES = pa.schema([
    ("job_id", pa.string()),
    *_WHO,
    ("iteration", pa.int64()),
    ("method", pa.string()),
    ("layer", pa.int64()),
    ("removed_before", _LAYERS),
    ("value", pa.float64()),
    ("kept", pa.bool_()),
    _RECORDED,
])

SCHEMAS = {"candidates": CANDIDATES, "selections": SELECTIONS, "finals": FINALS,
           "scores": SCORES}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def final_row(who: dict, *, run_id: str, parent_run_id: str, checkpoint, evaluation,
              selection, diverged: bool, plan, parameters: int, encoder_density: float,
              train_examples: int, reused: bool, **extra) -> dict:
    """One ``finals`` row: a final model (any method) with its dev and selection scores.

    ``who`` holds the job and its subject (job_id, strategy, variant, model, task, method);
    ``extra`` adds columns such as ``latency_ms`` or ``target_density``. Keys starting with
    ``_`` (the checkpoint) travel with the row in memory and are never written.
    """
    return {
        **who, "run_id": run_id, "parent_run_id": parent_run_id, "depth": plan.depth,
        "removed": list(plan.removed), "seed": checkpoint.seed, "metric": evaluation.metric,
        "value": evaluation.score, "selection_value": selection.score, "diverged": diverged,
        "metrics_json": json.dumps(evaluation.metrics, sort_keys=True),
        "plan": plan.to_json(), "parameters": parameters, "encoder_density": encoder_density,
        "model_dir": checkpoint.path, "train_examples": train_examples,
        "eval_examples": evaluation.examples, "fine_tune_seconds": checkpoint.seconds,
        "eval_seconds": evaluation.seconds, "device": checkpoint.device,
        "cache_key": checkpoint.key, "reused": reused, "recorded_at": now(),
        "distilled": False, "_path": checkpoint.path, "_checkpoint": checkpoint, **extra,
    }


def candidate_row(base: dict, record, *, run_id: str, parent_run_id: str, num_layers: int,
                  train_examples: int, reused: bool) -> dict:
    """One ``candidates`` row from a strategy's ``CandidateScored`` record."""
    checkpoint, evaluation = record.result.checkpoint, record.result.evaluation
    return {
        **base, "run_id": run_id, "parent_run_id": parent_run_id,
        "flow_run_id": checkpoint.flow_run_id, "iteration": record.iteration,
        "layer": record.layer, "removed": list(record.removed),
        "depth": num_layers - len(record.removed), "metric": evaluation.metric,
        "value": evaluation.score, "diverged": evaluation.diverged,
        "metrics_json": json.dumps(evaluation.metrics, sort_keys=True),
        "seed": checkpoint.seed, "budget": record.budget, "train_examples": train_examples,
        "eval_examples": evaluation.examples, "fine_tune_seconds": checkpoint.seconds,
        "eval_seconds": evaluation.seconds, "device": checkpoint.device,
        "cache_key": checkpoint.key, "reused": reused, "recorded_at": now(),
    }


def score_row(base: dict, record) -> dict:
    """One ``scores`` row from a ``LayerScored`` record (a zero-shot layer score)."""
    return {**base, "iteration": record.iteration, "method": record.method,
            "layer": record.layer, "removed_before": list(record.removed),
            "value": record.value, "kept": record.kept, "recorded_at": now()}


def selection_row(base: dict, *, run_id: str, iteration: int, layer: int | None,
                  order: list[int], num_layers: int, metric: str, value: float | None,
                  candidates: int, cache_key: str) -> dict:
    """One ``selections`` row: a layer (or a subset) chosen."""
    return {**base, "run_id": run_id, "iteration": iteration, "layer": layer, "order": order,
            "depth": num_layers - len(order), "metric": metric, "value": value,
            "candidates": candidates, "cache_key": cache_key, "recorded_at": now()}


def written(row: dict) -> dict:
    """A row without its in-memory keys (``_path``, ``_checkpoint``)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def write_part(root: Path, table: str, job_id: str, part: str, rows: list[dict]) -> Path:
    """Write (or replace) one part of a job's table atomically."""
    schema = SCHEMAS[table]
    folder = Path(root) / table / job_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{part}.parquet"
    data = pa.Table.from_pylist([{k: row.get(k) for k in schema.names} for row in rows], schema)
    tmp = folder / f".{part}.{os.getpid()}.tmp"
    pq.write_table(data, tmp)
    os.replace(tmp, path)
    return path


@task(name="record-rows", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=faults.retry_unless_hopeless)
def record_rows(root: Path, table: str, job_id: str, part: str, rows: list[dict]) -> str:
    """Write one part of an audit table (idempotent: a retry replaces the same file)."""
    faults.inject("record")
    return str(write_part(root, table, job_id, part, rows))
