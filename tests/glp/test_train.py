"""The fine-tuning loop on a tiny random BERT and a synthetic, learnable toy task."""

from __future__ import annotations

import copy
import math

import datasets
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from glp.training.config import FineTuneConfig
from glp.training.train import TrainStats, _epoch_batches, evaluate, fine_tune, predict, total_steps

VOCAB = 100
SIGNAL = 5  # the label is whether this token occurs
CLS, SEP = 2, 3


def tiny_model(num_labels: int = 2, seed: int = 0, **kwargs) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
        **kwargs,
    )
    return BertForSequenceClassification(config).eval()


def toy_dataset(n: int = 64, seed: int = 0, regression: bool = False) -> datasets.Dataset:
    """Rows of varying length; label 1 (or a count, for regression) when token 5 occurs."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels: list = []
    for i in range(n):
        length = int(rng.integers(3, 15))
        body = rng.integers(10, VOCAB, size=length).tolist()
        hits = int(rng.integers(1, 3)) if i % 2 else 0
        for _ in range(hits):
            body[int(rng.integers(0, length))] = SIGNAL
        ids = [CLS, *body, SEP]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["token_type_ids"].append([0] * len(ids))
        count = body.count(SIGNAL)
        labels.append(float(count) + 0.1 * length / 15 if regression else int(count > 0))
    features = datasets.Features(
        {k: datasets.List(datasets.Value("int64")) for k in rows}
        | {"labels": datasets.Value("float32" if regression else "int64")}
    )
    return datasets.Dataset.from_dict(rows | {"labels": labels}, features=features)


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def data() -> datasets.Dataset:
    return toy_dataset()


@pytest.fixture(scope="module")
def init() -> BertForSequenceClassification:
    return tiny_model()


FAST = FineTuneConfig(learning_rate=3e-3, batch_size=8, epochs=1.0, eval_batch_size=16)


def test_fine_tune_is_deterministic_for_a_seed(data, init) -> None:
    a, b, c = (copy.deepcopy(init) for _ in range(3))
    stats_a = fine_tune(a, data, FAST, seed=7)
    stats_b = fine_tune(b, data, FAST, seed=7)
    fine_tune(c, data, FAST, seed=8)
    assert torch.equal(flat_weights(a), flat_weights(b))
    assert stats_a.final_loss == stats_b.final_loss
    np.testing.assert_array_equal(predict(a, data), predict(b, data))
    assert not torch.equal(flat_weights(a), flat_weights(c))
    assert not torch.equal(flat_weights(a), flat_weights(init))  # it trained in place
    assert not a.training  # left in eval mode


def mean_cross_entropy(model, data) -> float:
    logits = torch.from_numpy(predict(model, data))
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(data["labels"])))


def test_fine_tune_learns_the_toy_task(data) -> None:
    model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    loss_before = mean_cross_entropy(model, data)
    config = FineTuneConfig(learning_rate=3e-3, batch_size=8, epochs=8.0)
    fine_tune(model, data, config, seed=0)
    assert mean_cross_entropy(model, data) < 0.8 * min(loss_before, np.log(2))
    assert evaluate(model, data, is_regression=False)["accuracy"] >= 0.95
    held_out = evaluate(model, toy_dataset(64, seed=99), is_regression=False)
    assert held_out["accuracy"] >= 0.8  # chance is 0.5


def test_total_steps_and_the_step_callback(data, init) -> None:
    assert total_steps(64, FineTuneConfig(batch_size=8, epochs=1.0)) == 8
    assert total_steps(65, FineTuneConfig(batch_size=8, epochs=1.0)) == 9
    assert total_steps(64, FineTuneConfig(batch_size=8, epochs=3.0)) == 24
    assert total_steps(64, FineTuneConfig(batch_size=8, epochs=0.3)) == 3  # ceil(2.4)
    assert total_steps(1, FineTuneConfig(batch_size=32, epochs=0.01)) == 1  # never zero

    calls: list[tuple[int, int]] = []
    config = FineTuneConfig(learning_rate=1e-3, batch_size=8, epochs=2.0)
    stats = fine_tune(copy.deepcopy(init), data, config, seed=0, on_step=lambda *a: calls.append(a))
    assert calls == [(i, 16) for i in range(1, 17)]
    assert isinstance(stats, TrainStats)
    assert stats.steps == 16
    assert stats.examples == 128
    assert stats.seconds > 0
    assert np.isfinite(stats.final_loss)


def test_fractional_epochs(data, init) -> None:
    # 60 rows in batches of 8: 8 batches per epoch (the last one of 4 rows).
    part = data.select(range(60))
    calls: list[tuple[int, int]] = []
    config = FineTuneConfig(learning_rate=1e-3, batch_size=8, epochs=0.5)
    stats = fine_tune(copy.deepcopy(init), part, config, seed=0, on_step=lambda *a: calls.append(a))
    assert stats.steps == 4 == len(calls)
    assert calls[-1] == (4, 4)
    assert 4 * 4 <= stats.examples <= 4 * 8

    # 1.5 epochs continue into a second, reshuffled epoch: every row seen at least once.
    config = FineTuneConfig(learning_rate=1e-3, batch_size=8, epochs=1.5)
    stats = fine_tune(copy.deepcopy(init), part, config, seed=0)
    assert stats.steps == 12
    assert 60 + 4 * 4 <= stats.examples <= 60 + 4 * 8


def test_empty_dataset_is_rejected(data, init) -> None:
    with pytest.raises(ValueError, match="empty"):
        fine_tune(copy.deepcopy(init), data.select([]), FAST, seed=0)


def test_regression_runs_and_reports_correlations() -> None:
    data = toy_dataset(64, seed=2, regression=True)
    assert isinstance(data[0]["labels"], float)
    model = tiny_model(
        num_labels=1,
        problem_type="regression",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    labels = np.asarray(data["labels"])
    mse_before = float(np.mean((predict(model, data)[:, 0] - labels) ** 2))
    config = FineTuneConfig(learning_rate=3e-3, batch_size=8, epochs=8.0)
    stats = fine_tune(model, data, config, seed=0)
    assert np.isfinite(stats.final_loss)
    scores = predict(model, data)
    assert scores.shape == (64, 1) and scores.dtype == np.float32
    assert float(np.mean((scores[:, 0] - labels) ** 2)) < 0.5 * mse_before
    metrics = evaluate(model, data, is_regression=True)
    assert set(metrics) == {"pearson", "spearman", "loss"}
    assert all(type(v) is float for v in metrics.values())
    assert metrics["pearson"] > 0.5  # it learnt to count the signal token
    assert metrics["loss"] == pytest.approx(float(np.mean((scores[:, 0] - labels) ** 2)),
                                            rel=1e-5)


def test_predict_keeps_input_order(data, init) -> None:
    # Lengths vary, so predict's length sorting reorders rows internally.
    lengths = [len(ids) for ids in data["input_ids"]]
    assert lengths != sorted(lengths)
    model = copy.deepcopy(init)
    for batch_size in (5, 128):
        got = predict(model, data, batch_size=batch_size)
        assert got.shape == (len(data), 2)
        expected = []
        with torch.inference_mode():
            for row in data:
                inputs = {
                    k: torch.tensor([row[k]])
                    for k in ("input_ids", "attention_mask", "token_type_ids")
                }
                expected.append(model(**inputs).logits[0].numpy())
        np.testing.assert_allclose(got, np.stack(expected), atol=1e-5, rtol=1e-4)


def test_predict_without_labels_or_token_type_ids(data, init) -> None:
    stripped = data.remove_columns(["labels", "token_type_ids"])
    got = predict(init, stripped, batch_size=7)
    np.testing.assert_allclose(got, predict(init, data, batch_size=7), atol=1e-6)


def test_evaluate_metric_keys(data, init) -> None:
    metrics = evaluate(init, data, is_regression=False, batch_size=16)
    assert set(metrics) == {"accuracy", "f1", "mcc", "loss"}
    assert all(type(v) is float for v in metrics.values())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # the loss is the mean cross-entropy of the logits
    logits = torch.from_numpy(predict(init, data))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(data["labels"]))
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


# --- batch order --------------------------------------------------------------------------

# Sizes below, at and above a batch multiple, and above the 50-batch sorting chunk.
SIZES = [1, 5, 8, 9, 23, 64, 401, 1003]


def distinct_lengths(n: int, seed: int = 0) -> list[int]:
    """Row lengths that are all different (a shuffled range), so sorted runs are unique."""
    return (np.random.default_rng(seed).permutation(n) + 3).tolist()


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("n", SIZES)
def test_an_epoch_yields_every_row_once(n, batch_size, group) -> None:
    lengths = distinct_lengths(n)
    rng = np.random.default_rng(0)
    for _ in range(2):  # a later epoch from the same generator too
        batches = _epoch_batches(lengths, batch_size, rng, group)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(isinstance(i, int) for b in batches for i in b)
        assert len(batches) == math.ceil(n / batch_size)
        assert all(1 <= len(b) <= batch_size for b in batches)
        # Only the rows that do not fill a batch make a short one: at most one per epoch.
        assert sum(len(b) < batch_size for b in batches) == (1 if n % batch_size else 0)


@pytest.mark.parametrize(("n", "batch_size"), [(9, 3), (64, 8), (397, 8), (23, 1)])
def test_grouped_batches_are_consecutive_runs_of_the_sorted_lengths(n, batch_size) -> None:
    # Up to 50 batches form one sorting chunk: the batches tile the length-sorted rows.
    assert n <= 50 * batch_size
    lengths = distinct_lengths(n, seed=n)
    batches = _epoch_batches(lengths, batch_size, np.random.default_rng(1), True)
    for b in batches:
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    tiled = [i for b in sorted(batches, key=lambda b: lengths[b[0]]) for i in b]
    assert tiled == sorted(range(n), key=lambda i: lengths[i])


def test_grouping_across_chunks_sorts_within_each_chunk() -> None:
    n, batch_size = 1003, 8  # three chunks of up to 400 rows
    lengths = distinct_lengths(n)
    grouped = _epoch_batches(lengths, batch_size, np.random.default_rng(2), True)
    shuffled = _epoch_batches(lengths, batch_size, np.random.default_rng(2), False)
    for b in grouped:
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    # Each batch is a run of neighbouring lengths within a 400-row sample, so it spans a
    # few dozen lengths, not a random batch's hundreds: far less padding.
    assert padding(grouped, lengths) < padding(shuffled, lengths) / 10
    # Sorting per chunk, not over the whole epoch: a second epoch groups other rows.
    rng = np.random.default_rng(2)
    first, second = (_epoch_batches(lengths, batch_size, rng, True) for _ in range(2))
    assert {frozenset(b) for b in first} != {frozenset(b) for b in second}


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped"])
@pytest.mark.parametrize("n", [40, 1003])
def test_epochs_from_one_generator_differ_and_a_seed_repeats_them(n, group) -> None:
    lengths = distinct_lengths(n)
    rng = np.random.default_rng(3)
    first, second = (_epoch_batches(lengths, 8, rng, group) for _ in range(2))
    assert first != second
    assert [i for b in first for i in b] != [i for b in second for i in b]
    again = np.random.default_rng(3)
    assert [_epoch_batches(lengths, 8, again, group) for _ in range(2)] == [first, second]


# --- clipping, divergence, devices -------------------------------------------------------


def test_gradients_are_clipped_at_1_by_default(data, init, monkeypatch) -> None:
    assert FineTuneConfig().max_grad_norm == 1.0  # the HF Trainer's default
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        before = real(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        calls.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    config = FineTuneConfig(learning_rate=1e-3, batch_size=16, epochs=1.0)
    fine_tune(copy.deepcopy(init), data, config, seed=1)
    assert [c[0] for c in calls] == [1.0] * total_steps(len(data), config)
    calls.clear()
    tight = FineTuneConfig(learning_rate=1e-3, batch_size=16, epochs=1.0, max_grad_norm=0.01)
    fine_tune(copy.deepcopy(init), data, tight, seed=1)
    assert all(before > 0.01 and after <= 0.01 * (1 + 1e-4) for _, before, after in calls)
    calls.clear()
    fine_tune(copy.deepcopy(init), data, FineTuneConfig(batch_size=16, epochs=1.0,
                                                        max_grad_norm=None), seed=1)
    assert calls == []  # off means off


def _learning_rates(model, data, config, monkeypatch) -> list[float]:
    """The learning rate of every optimisation step of a fine-tune (read as AdamW steps)."""
    rates = []
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    fine_tune(model, data, config, seed=1)
    monkeypatch.undo()
    return rates


def _linear_factor(step: int, warmup: int, total: int) -> float:
    """The schedule glp's loop had before transformers' (the reference for the decay)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize(("epochs", "batch_size"), [(1.0, 8), (2.5, 8), (0.3, 16), (1.7, 5)])
def test_without_warm_up_the_learning_rate_decays_linearly_to_0_as_before(
    data, init, monkeypatch, epochs, batch_size
) -> None:
    config = FineTuneConfig(learning_rate=1e-3, batch_size=batch_size, epochs=epochs)
    steps = total_steps(len(data), config)
    rates = _learning_rates(copy.deepcopy(init), data, config, monkeypatch)
    assert rates == [1e-3 * _linear_factor(s, 0, steps) for s in range(steps)]  # exactly
    assert rates[0] == 1e-3 and rates[-1] == 1e-3 / steps


@pytest.mark.parametrize(("warmup_ratio", "epochs"), [(0.1, 2.5), (0.1, 1.3), (0.25, 1.7)])
def test_the_warm_up_starts_at_0_and_then_decays_as_before(
    data, init, monkeypatch, warmup_ratio, epochs
) -> None:
    config = FineTuneConfig(learning_rate=1e-3, batch_size=8, epochs=epochs,
                            warmup_ratio=warmup_ratio)
    steps = total_steps(len(data), config)
    warmup = int(warmup_ratio * steps)
    assert warmup >= 1
    rates = _learning_rates(copy.deepcopy(init), data, config, monkeypatch)
    assert len(rates) == steps
    # transformers' warm-up (as the HF Trainer's) rises from 0: step s of the warm-up runs
    # at s / warmup of the peak, the rate the hand-written schedule gave step s - 1.
    assert rates[:warmup] == [1e-3 * s / warmup for s in range(warmup)]
    assert rates[1:warmup] == [1e-3 * _linear_factor(s, warmup, steps) for s in range(warmup - 1)]
    # From the peak on, the same decay as before, step for step.
    assert rates[warmup:] == [1e-3 * _linear_factor(s, warmup, steps)
                              for s in range(warmup, steps)]
    assert rates[warmup] == 1e-3


def test_a_non_finite_loss_stops_the_fine_tune_as_diverged(data, init) -> None:
    model = copy.deepcopy(init)
    config = FineTuneConfig(learning_rate=1e30, batch_size=16, epochs=3.0, max_grad_norm=None)
    stats = fine_tune(model, data, config, seed=1)
    assert stats.diverged and not math.isfinite(stats.final_loss)
    assert stats.steps < total_steps(len(data), config)  # stopped early
    metrics = evaluate(model, data, is_regression=False)
    assert all(math.isnan(v) for v in metrics.values())  # never a score such as 0.0


def test_a_nan_regression_target_diverges() -> None:
    rows = toy_dataset(32, regression=True).to_dict()
    rows["labels"][3] = float("nan")
    data = datasets.Dataset.from_dict(rows)
    model = tiny_model(num_labels=1, problem_type="regression")
    stats = fine_tune(model, data, FineTuneConfig(batch_size=32, epochs=1.0), seed=0)
    assert stats.diverged


def test_a_finite_fine_tune_is_not_diverged_and_records_its_device(data, init) -> None:
    stats = fine_tune(copy.deepcopy(init), data, FineTuneConfig(batch_size=16, epochs=1.0),
                      seed=1)
    assert not stats.diverged and stats.device == "cpu"


def test_device_specs() -> None:
    from glp import GlpError
    from glp.training.train import check_precision, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device(" AUTO ") == torch.device(expected)
    with pytest.raises(GlpError, match="device 'tpu': choose auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(GlpError, match="cuda or cuda:N"):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(GlpError, match="sees no CUDA device"):
            resolve_device("cuda:0")
    check_precision("fp32", torch.device("cpu"))
    with pytest.raises(GlpError, match="mixed precision is for a CUDA device"):
        check_precision("bf16", torch.device("cpu"))
    with pytest.raises(GlpError, match="choose one of fp32, bf16, fp16"):
        check_precision("fp64", torch.device("cpu"))


def test_the_cpu_path_keeps_the_model_and_batches_on_the_cpu(data, init, monkeypatch) -> None:
    seen = set()
    model = copy.deepcopy(init)
    real = model.forward

    def forward(**batch):
        seen.update(t.device.type for t in batch.values())
        return real(**batch)

    monkeypatch.setattr(model, "forward", forward)
    fine_tune(model, data, FineTuneConfig(batch_size=16, epochs=1.0), seed=1, device="auto"
              if not torch.cuda.is_available() else "cpu")
    predict(model, data, device="cpu")
    assert seen == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fine_tune_on_a_gpu(data, init, precision) -> None:
    model = copy.deepcopy(init)
    stats = fine_tune(model, data, FineTuneConfig(batch_size=16, epochs=1.0,
                                                  precision=precision), seed=1, device="cuda")
    assert stats.device == "cuda:0" and not stats.diverged
    assert next(model.parameters()).device.type == "cuda"
    assert np.isfinite(predict(model, data)).all()


def test_a_batch_over_the_token_budget_trains_as_micro_batches_with_equal_results(
        data, init, monkeypatch) -> None:
    """Long rows: the batch runs as several passes whose gradients add up to the batch's,
    so the weights come out as from one pass (up to float rounding), and no pass holds
    more padded tokens than the budget."""
    import glp.training.train as train
    from glp.training import data as glp_data

    model_of = {}
    widest = []
    collate = glp_data.collate

    def watched(dataset, indices, pad_id, **kwargs):
        batch = collate(dataset, indices, pad_id, **kwargs)
        widest.append(batch["input_ids"].numel())
        return batch

    config = FineTuneConfig(learning_rate=3e-3, batch_size=16, epochs=1.0)
    no_dropout = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for budget in (10_000, 40):
        monkeypatch.setattr(train, "MAX_BATCH_TOKENS", budget)
        monkeypatch.setattr(train, "collate", watched)
        widest.clear()
        model_of[budget] = copy.deepcopy(no_dropout)
        stats = fine_tune(model_of[budget], data, config, seed=3)
        assert stats.examples == len(data) and stats.steps == 4
        if budget == 40:
            assert max(widest) <= 40 and len(widest) > stats.steps  # split, within budget
    torch.testing.assert_close(flat_weights(model_of[40]), flat_weights(model_of[10_000]),
                               rtol=1e-4, atol=1e-5)


def test_prediction_passes_stay_within_the_token_budget(data, init) -> None:
    from glp.training.train import micro_batches

    whole = predict(init, data)
    np.testing.assert_allclose(predict(init, data, max_tokens=30), whole, atol=1e-5)
    lengths = [len(ids) for ids in data["input_ids"]]
    groups = micro_batches(list(range(16)), lengths, 40)
    assert sorted(i for g in groups for i in g) == list(range(16))
    assert all(len(g) * max(lengths[i] for i in g) <= 40 for g in groups)  # short rows
    assert micro_batches([0, 1], lengths, 10_000) == [[0, 1]]  # fits: one batch, as given
