"""A final model as it is deployed in int8: its text-in ONNX folder, and its score.

``evaluate-int8`` writes the folder (:func:`glp.deploy.export.write_text_model` with
onnxruntime's dynamic int8 quantisation) under ``artifacts/int8/<key>`` and scores it on a
split's rows given as text, through the tokenizer inside the folder: what a user of the
int8 graph gets, with the same metric as the PyTorch score beside it. Cached like every
evaluation; the key holds the checkpoint, the rows, the length and this code.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

from glp.core.hashing import stable_hash
from glp.core.provenance import code_fingerprint, library_versions
from glp.training.metrics import compute_metrics, selection_score
from tasks import faults
from tasks.data import DataRef, is_pair
from tasks.home import RunHome
from tasks.training import CACHED, Checkpoint, Evaluation, _current_flow_run

CODE = "tasks.deployment"


def int8_key(checkpoint: Checkpoint, data: DataRef, split: str, max_length: int) -> str:
    """Everything that decides an int8 score: the model, the rows, the length, this code
    and the libraries that quantise, tokenize and run it."""
    import onnxruntime
    import tokenizers

    versions = {**library_versions(), "onnxruntime": onnxruntime.__version__,
                "tokenizers": tokenizers.__version__}
    return stable_hash("int8", checkpoint.key, data.fingerprints[split], data.metric,
                       max_length, code_fingerprint(CODE, versions=versions))


def int8_folder(home: RunHome, key: str) -> Path:
    """Where the int8 text-in folder of an ``evaluate-int8`` result lives."""
    return home.artifacts / "int8" / key


def run_int8_evaluation(checkpoint: Checkpoint, data: DataRef, split: str, max_length: int,
                        home: RunHome) -> Evaluation:
    """Write the int8 folder (atomically) and score it on ``split``'s text rows."""
    import numpy as np

    from glp.deploy.export import write_text_model
    from glp.deploy.text_model import TextModel

    faults.inject("evaluate")
    start = time.perf_counter()
    key = int8_key(checkpoint, data, split, max_length)
    folder = int8_folder(home, key)
    if not (folder / "model.onnx").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write_text_model(checkpoint.path, tmp, labels=data.label_names,
                             max_length=max_length, pair=is_pair(data), int8=True)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = data.load(split)
    logits = TextModel(folder).logits(
        rows["text_a"], rows["text_b"] if "text_b" in rows.column_names else None)
    labels = np.asarray(rows["label"])
    metrics = compute_metrics(logits, labels, is_regression=data.is_regression)
    score = selection_score(metrics, data.metric)
    return Evaluation(key=key, checkpoint_key=checkpoint.key, split=split, metric=data.metric,
                      score=score, metrics=metrics, examples=len(labels),
                      seconds=round(time.perf_counter() - start, 3),
                      flow_run_id=_current_flow_run(), diverged=score != score)


def _key(context, parameters) -> str:
    return int8_key(parameters["checkpoint"], parameters["data"], parameters["split"],
                    parameters["max_length"])


@task(name="evaluate-int8", cache_policy=TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_key),
      **CACHED)
def evaluate_int8(checkpoint: Checkpoint, data: DataRef, split: str, max_length: int,
                  home: RunHome) -> Evaluation:
    """A final model's int8 text-in folder, scored on ``split`` (the dev rows)."""
    return run_int8_evaluation(checkpoint, data, split, max_length, home)
