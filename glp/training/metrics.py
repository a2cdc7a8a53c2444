"""Evaluation metrics for GLUE-style tasks, and the score that selects layers.

Only scikit-learn and SciPy are used (not the ``evaluate`` package), so metrics work
offline and give the same numbers everywhere. Every metric is "higher is better".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from glp.core.errors import GlpError

__all__ = [
    "CLASSIFICATION_METRICS",
    "METRICS",
    "REGRESSION_METRICS",
    "compute_metrics",
    "selection_score",
]

CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "f1", "mcc")
REGRESSION_METRICS: tuple[str, ...] = ("pearson", "spearman")
METRICS: tuple[str, ...] = CLASSIFICATION_METRICS + REGRESSION_METRICS


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    # A constant side (e.g. a collapsed regressor) has no defined correlation; scipy
    # warns and returns NaN. 0.0 ranks such a model as "no better than chance" instead.
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    value = float(fn(x, y)[0])
    return 0.0 if math.isnan(value) else value


def compute_metrics(predictions, labels, *, is_regression: bool) -> dict[str, float]:
    """All metrics of a task family.

    Args:
        predictions: logits of shape (N, C) for classification (argmax is taken; a 1-D
            array is read as predicted class indices), or scores of shape (N,) or (N, 1)
            for regression.
        labels: gold class indices or scores, shape (N,).
        is_regression: whether the task is regression.

    Returns:
        Classification: ``accuracy``, ``f1`` (binary F1 of class 1 for two classes, macro
        F1 over the classes present otherwise) and ``mcc``. Regression: ``pearson`` and
        ``spearman`` (0.0 when either side is constant). All plain Python floats.

    Raises:
        GlpError: empty input, or predictions and labels of different lengths or bad shape.
    """
    # Imported here: SciPy and scikit-learn take ~0.7 s to import, which a command pays
    # while its Prefect server starts (flows/launch.py) instead of before checking inputs.
    from scipy import stats
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = np.asarray(predictions)
    gold = np.asarray(labels).reshape(-1)
    if len(gold) == 0:
        raise GlpError("cannot compute metrics on 0 examples; expected at least one label")
    if preds.shape[0] != len(gold):
        raise GlpError(
            f"predictions have {preds.shape[0]} rows but there are {len(gold)} labels; "
            "expected one prediction per label"
        )
    if is_regression:
        if preds.ndim > 2 or (preds.ndim == 2 and preds.shape[1] != 1):
            raise GlpError(
                f"regression predictions must have shape (N,) or (N, 1), got {preds.shape}"
            )
        x = preds.reshape(-1).astype(np.float64)
        y = gold.astype(np.float64)
        return {
            "pearson": _correlation(stats.pearsonr, x, y),
            "spearman": _correlation(stats.spearmanr, x, y),
        }
    if preds.ndim == 2:
        num_classes = preds.shape[1]
        pred_ids = preds.argmax(axis=1)
    elif preds.ndim == 1:
        pred_ids = preds.astype(np.int64)
        num_classes = int(max(pred_ids.max(), gold.max())) + 1
    else:
        raise GlpError(
            f"classification predictions must have shape (N, C) or (N,), got {preds.shape}"
        )
    gold = gold.astype(np.int64)
    if num_classes <= 2:
        # GLUE's F1 (MRPC, QQP) is the F1 of the positive class 1.
        f1 = f1_score(gold, pred_ids, average="binary", pos_label=1, zero_division=0)
    else:
        f1 = f1_score(gold, pred_ids, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred_ids)),
        "f1": float(f1),
        "mcc": float(matthews_corrcoef(gold, pred_ids)),
    }


def selection_score(metrics: Mapping[str, float], name: str) -> float:
    """The metric that selects layers, read from ``compute_metrics`` output.

    Args:
        metrics: the metrics dict.
        name: one of ``METRICS``.

    Returns:
        The score as a float (higher is better).

    Raises:
        GlpError: ``name`` is not a known metric, or ``metrics`` lacks it.
    """
    if name not in METRICS:
        raise GlpError(f"unknown selection metric {name!r}; choose one of: {', '.join(METRICS)}")
    if name not in metrics:
        have = ", ".join(sorted(metrics)) or "(none)"
        raise GlpError(
            f"metric {name!r} was not computed (classification and regression tasks have "
            f"different metrics); available: {have}"
        )
    return float(metrics[name])
