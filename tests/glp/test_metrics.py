"""Tests for glp.training.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glp import GlpError
from glp.training.metrics import METRICS, compute_metrics, selection_score


def _logits(pred_ids: list[int], num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[pred_ids] * 3.0 - 1.0


def test_binary_classification() -> None:
    # TP=2, FP=1, FN=1, TN=2.
    labels = [1, 1, 1, 0, 0, 0]
    got = compute_metrics(_logits([1, 1, 0, 1, 0, 0], 2), labels, is_regression=False)
    assert got == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3, "mcc": 1 / 3})
    assert all(type(v) is float for v in got.values())


def test_binary_f1_is_of_class_one() -> None:
    # Class 1: TP=1, FP=0, FN=1 -> F1 2/3; class 0's F1 would be 0.8.
    got = compute_metrics(_logits([1, 0, 0, 0], 2), [1, 1, 0, 0], is_regression=False)
    assert got["f1"] == pytest.approx(2 / 3)


def test_multiclass_uses_macro_f1() -> None:
    # Per-class F1: class 0 = 1, class 1 = 0, class 2 = 0.8 (P 2/3, R 1) -> macro 0.6.
    # MCC = (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    #     = (3*4 - 7) / sqrt((16 - 10)(16 - 6)) = 5 / sqrt(60).
    got = compute_metrics(_logits([0, 2, 2, 2], 3), [0, 1, 2, 2], is_regression=False)
    assert got == pytest.approx({"accuracy": 0.75, "f1": 0.6, "mcc": 5 / math.sqrt(60)})


def test_class_ids_accepted() -> None:
    got = compute_metrics(np.array([1, 1, 0, 1, 0, 0]), [1, 1, 1, 0, 0, 0], is_regression=False)
    assert got["f1"] == pytest.approx(2 / 3)


def test_constant_classifier() -> None:
    got = compute_metrics(_logits([0, 0, 0, 0], 2), [1, 0, 1, 0], is_regression=False)
    assert got == {"accuracy": 0.5, "f1": 0.0, "mcc": 0.0}


def test_regression_known_values() -> None:
    # Pearson: dx = (-1.5, -.5, .5, 1.5), dy = (-3, -2, -1, 6): 14 / sqrt(5 * 50).
    got = compute_metrics(np.array([1.0, 2.0, 3.0, 4.0]), [1.0, 2.0, 3.0, 10.0], is_regression=True)
    assert got == pytest.approx({"pearson": 14 / math.sqrt(250), "spearman": 1.0})
    assert all(type(v) is float for v in got.values())


def test_regression_column_predictions() -> None:
    # Spearman = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 12 / 60; ranks, so Pearson agrees.
    preds = np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32)
    got = compute_metrics(preds, np.array([1.0, 3.0, 2.0, 4.0]), is_regression=True)
    assert got == pytest.approx({"pearson": 0.8, "spearman": 0.8})


def test_regression_constant_prediction_is_zero() -> None:
    got = compute_metrics(np.full((5, 1), 2.5), [0.0, 1.0, 2.0, 3.0, 4.0], is_regression=True)
    assert got == {"pearson": 0.0, "spearman": 0.0}
    got = compute_metrics(np.arange(3.0), [1.0, 1.0, 1.0], is_regression=True)
    assert got == {"pearson": 0.0, "spearman": 0.0}


def test_bad_shapes() -> None:
    with pytest.raises(GlpError, match="3 rows but there are 2 labels"):
        compute_metrics(np.zeros((3, 2)), [0, 1], is_regression=False)
    with pytest.raises(GlpError, match=r"\(2, 3\)"):
        compute_metrics(np.zeros((2, 3)), [0.0, 1.0], is_regression=True)
    with pytest.raises(GlpError, match="0 examples"):
        compute_metrics(np.zeros((0, 2)), [], is_regression=False)


def test_selection_score() -> None:
    assert set(METRICS) == {"accuracy", "f1", "mcc", "pearson", "spearman"}
    metrics = {"accuracy": 0.5, "f1": 0.25, "mcc": 0.1}
    assert selection_score(metrics, "f1") == 0.25
    assert type(selection_score({"mcc": np.float32(0.5)}, "mcc")) is float


def test_selection_score_errors() -> None:
    with pytest.raises(GlpError) as err:
        selection_score({"accuracy": 1.0}, "bleu")
    assert str(err.value) == (
        "unknown selection metric 'bleu'; choose one of: accuracy, f1, mcc, pearson, spearman"
    )
    with pytest.raises(GlpError, match="'spearman'.*available: accuracy"):
        selection_score({"accuracy": 1.0}, "spearman")
