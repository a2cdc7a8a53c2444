"""Latency measurement: the padded batch, the statistics, the round-robin order, and a deep
model against the same model with most layers removed."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from glp import GlpError
from glp.core.surgery import remove_layers
from glp.deploy.bench import Latency, latency_batch, measure_latency

LENGTHS = [5, 9, 3, 7, 12, 4]


def toy_dataset() -> datasets.Dataset:
    """Tokenised rows of the lengths in LENGTHS (ids in 10..99, all unmasked)."""
    ids = [[2, *range(10, 10 + n - 2), 3] for n in LENGTHS]
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int64")),
            "attention_mask": datasets.List(datasets.Value("int64")),
            "token_type_ids": datasets.List(datasets.Value("int64")),
            "labels": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(row) for row in ids],
            "token_type_ids": [[0] * len(row) for row in ids],
            "labels": [i % 2 for i in range(len(ids))],
        },
        features=features,
    )


def tiny_model(layers: int, hidden: int = 32, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 4,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(config).eval()


class Recorder(torch.nn.Module):
    """Wraps a model and appends its name to a shared log on every forward pass."""

    def __init__(self, name: str, log: list[str], inner: torch.nn.Module) -> None:
        super().__init__()
        self.name, self.log, self.inner = name, log, inner

    def forward(self, **inputs):
        self.log.append(self.name)
        return self.inner(**inputs)


def test_latency_batch_pads_the_first_rows_and_drops_labels():
    batch = latency_batch(toy_dataset(), batch_size=4, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].shape == (4, max(LENGTHS[:4]))
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == LENGTHS[:4]
    assert batch["input_ids"][2, LENGTHS[2] :].eq(0).all()
    # Fewer rows than asked for: the whole dataset.
    assert latency_batch(toy_dataset(), batch_size=100)["input_ids"].shape == (6, 12)


def test_latency_batch_rejects_bad_arguments():
    with pytest.raises(GlpError, match="batch_size"):
        latency_batch(toy_dataset(), batch_size=0)
    with pytest.raises(GlpError, match="empty"):
        latency_batch(toy_dataset().select([]))


def test_statistics_are_positive_ordered_and_count_the_batch():
    batch = latency_batch(toy_dataset(), batch_size=4)
    models = {"a": tiny_model(2), "b": tiny_model(1)}
    models["a"].train()
    result = measure_latency(models, batch, repeats=7, warmup=1)
    assert list(result) == ["a", "b"]
    assert models["a"].training and not models["b"].training  # modes restored
    for latency in result.values():
        assert isinstance(latency, Latency)
        assert latency.repeats == 7
        assert latency.batch_size == 4
        assert latency.tokens == 4 * max(LENGTHS[:4])
        assert 0.0 < latency.median_ms <= latency.p90_ms
        assert latency.mean_ms > 0.0


def test_rounds_are_round_robin_with_rotated_order():
    log: list[str] = []
    models = {name: Recorder(name, log, tiny_model(1)) for name in "abc"}
    result = measure_latency(models, latency_batch(toy_dataset(), 2), repeats=4, warmup=2)
    warm, timed = log[:6], log[6:]
    assert warm == ["a", "a", "b", "b", "c", "c"]
    assert timed == [*"abc", *"bca", *"cab", *"abc"]
    assert all(latency.repeats == 4 for latency in result.values())


def test_a_deep_model_is_slower_than_its_pruned_copy():
    batch = latency_batch(toy_dataset(), batch_size=6)
    deep = tiny_model(12, hidden=64)
    pruned = remove_layers(tiny_model(12, hidden=64), range(1, 12))
    result = measure_latency({"deep": deep, "pruned": pruned}, batch, repeats=10, warmup=2)
    # Twelve layers against one: several times slower; a factor of 2 leaves a wide margin.
    assert result["deep"].median_ms > 2 * result["pruned"].median_ms


def test_measure_latency_rejects_bad_arguments():
    batch = latency_batch(toy_dataset(), batch_size=2)
    model = {"m": tiny_model(1)}
    with pytest.raises(GlpError, match="no models"):
        measure_latency({}, batch)
    with pytest.raises(GlpError, match="repeats"):
        measure_latency(model, batch, repeats=0)
    with pytest.raises(GlpError, match="warmup"):
        measure_latency(model, batch, warmup=-1)
    with pytest.raises(GlpError, match="input_ids"):
        measure_latency(model, {"attention_mask": batch["attention_mask"]})
