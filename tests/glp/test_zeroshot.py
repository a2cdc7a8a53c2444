"""Zero-shot layer scores on tiny random BERTs: matrix shape and invariants, the scores
against a hand computation, an identity layer, pruned models and bad arguments."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from glp import GlpError
from glp.core.anatomy import encoder_layers
from glp.core.surgery import remove_layers
from glp.methods.layers.zeroshot import (
    LayerSimilarity,
    angular_distances,
    block_influence,
    hidden_state_similarity,
)
from glp.training.data import tokenize

SENTENCES = [
    "the film was a delight from start to finish",
    "dull",
    "an uneven but often striking debut",
    "i would not watch it again, not even for free",
    "bright, funny and far too short",
    "meh",
]


def tiny_model(layers: int = 3, seed: int = 0) -> BertForSequenceClassification:
    """Like the ``tiny_bert`` fixture (hidden 32), with weights large enough (std 0.5) that
    a random layer really changes its input: at BERT's usual 0.02 every layer is
    nearly an identity and the scores would all be close to zero."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def dataset(tiny_bert) -> datasets.Dataset:
    """Six sentences of different lengths, tokenised with the real MiniLM tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    raw = datasets.Dataset.from_dict({"text_a": SENTENCES, "label": [1, 0, 1, 0, 1, 0]})
    return tokenize(raw, tokenizer, max_length=32)


def hand_similarity(model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cosine and angular matrices computed one unpadded sentence at a time."""
    cos_rows, ang_rows = [], []
    with torch.inference_mode():
        for row in dataset:
            ids = torch.tensor([row["input_ids"]])
            out = model(input_ids=ids, output_hidden_states=True)
            states = torch.stack(out.hidden_states)[:, 0].double()  # (K+1, T, H)
            cos = torch.nn.functional.cosine_similarity(
                states[:, None], states[None, :], dim=-1
            )  # (K+1, K+1, T)
            cos_rows.append(cos)
            ang_rows.append(torch.arccos(cos.clamp(-1, 1)) / math.pi)
    return torch.cat(cos_rows, dim=-1).mean(-1), torch.cat(ang_rows, dim=-1).mean(-1)


def make_identity(layer: torch.nn.Module) -> None:
    """Turn a BERT layer into an identity on LayerNorm-ed input.

    A BERT layer computes ``h = LN1(x + W_o attn(x) + b_o)`` and ``y = LN2(h + W_2 f(h) +
    b_2)``. With both output projections zero and the LayerNorms at weight 1 and bias 0, it
    computes ``y = norm(norm(x))`` = ``norm(x)``, which is ``x`` itself (up to the LayerNorm
    epsilon) when ``x`` already has zero mean and unit variance over the hidden units, as
    the output of a LayerNorm with weight 1 and bias 0 does.
    """
    with torch.no_grad():
        for dense in (layer.attention.output.dense, layer.output.dense):
            dense.weight.zero_()
            dense.bias.zero_()
        for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()


def test_matrices_are_square_symmetric_in_range_with_exact_diagonal(dataset):
    sim = hidden_state_similarity(tiny_model(layers=3), dataset)
    assert sim.num_layers == 3
    assert len(sim.cosine) == len(sim.angular) == 4
    assert all(len(row) == 4 for row in (*sim.cosine, *sim.angular))
    assert sim.tokens == sum(len(ids) for ids in dataset["input_ids"])
    for i in range(4):
        assert sim.cosine[i][i] == 1.0
        assert sim.angular[i][i] == 0.0
        for j in range(4):
            assert sim.cosine[i][j] == sim.cosine[j][i]
            assert sim.angular[i][j] == sim.angular[j][i]
            assert -1.0 <= sim.cosine[i][j] <= 1.0
            assert 0.0 <= sim.angular[i][j] <= 1.0
    # Random layers with large weights really move the representation.
    assert all(sim.cosine[i][i + 1] < 0.99 for i in range(3))


def test_matches_a_hand_computation_without_padding(dataset):
    model = tiny_model(layers=3)
    # batch_size=4 pads the shorter rows; the padding must not enter the means.
    sim = hidden_state_similarity(model, dataset, batch_size=4)
    cos, ang = hand_similarity(model, dataset)
    assert torch.allclose(torch.tensor(sim.cosine, dtype=torch.float64), cos, atol=1e-5)
    assert torch.allclose(torch.tensor(sim.angular, dtype=torch.float64), ang, atol=1e-5)
    expected_bi = [1.0 - float(cos[i, i + 1]) for i in range(3)]
    assert block_influence(sim) == pytest.approx(expected_bi, abs=1e-5)


def test_deterministic_independent_of_batch_size_and_of_train_mode(dataset):
    model = tiny_model(layers=3)
    first = hidden_state_similarity(model, dataset, batch_size=64)
    assert hidden_state_similarity(model, dataset, batch_size=64) == first
    model.train()  # dropout must be switched off for the measurement, then the mode restored
    one_by_one = hidden_state_similarity(model, dataset, batch_size=1)
    assert model.training
    assert one_by_one.tokens == first.tokens
    for got, want in ((one_by_one.cosine, first.cosine), (one_by_one.angular, first.angular)):
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-6)


def test_max_examples_takes_the_first_rows(dataset):
    model = tiny_model(layers=3)
    sim = hidden_state_similarity(model, dataset, max_examples=2)
    assert sim.tokens == len(dataset[0]["input_ids"]) + len(dataset[1]["input_ids"])
    head = hidden_state_similarity(model, dataset.select(range(2)), max_examples=None)
    assert sim == head


def test_identity_layer_has_the_lowest_block_influence(dataset):
    model = tiny_model(layers=3)
    layers = encoder_layers(model)
    # Layer 1's input is layer 0's output LayerNorm (weight 1, bias 0 at initialisation),
    # so it is normalised and an identity-made layer 1 passes it through unchanged.
    assert torch.equal(layers[0].output.LayerNorm.weight, torch.ones(32))
    assert torch.equal(layers[0].output.LayerNorm.bias, torch.zeros(32))
    make_identity(layers[1])
    sim = hidden_state_similarity(model, dataset)
    bi = block_influence(sim)
    assert len(bi) == 3
    assert all(0.0 <= b <= 2.0 for b in bi)
    assert bi[1] < 1e-6
    assert min(bi[0], bi[2]) > 1e-3
    assert min(range(3), key=bi.__getitem__) == 1
    # The angular distance agrees: the one-layer block at 1 is (nearly) zero and smallest.
    single = angular_distances(sim, 1)
    assert single[1] < 1e-3
    assert min(range(3), key=single.__getitem__) == 1


def test_pruned_model_gives_smaller_matrices(dataset):
    model = tiny_model(layers=3)
    before = hidden_state_similarity(model, dataset)
    remove_layers(model, [1])
    after = hidden_state_similarity(model, dataset)
    assert after.num_layers == 2
    assert len(after.cosine) == len(after.angular) == 3
    assert all(len(row) == 3 for row in after.cosine)
    assert len(block_influence(after)) == 2
    # Embeddings and layer 0 are untouched, so their pair is unchanged.
    assert after.cosine[0][1] == pytest.approx(before.cosine[0][1], abs=1e-9)
    assert after.angular[0][1] == pytest.approx(before.angular[0][1], abs=1e-9)


def test_angular_distances_read_the_matrix(dataset):
    sim = hidden_state_similarity(tiny_model(layers=3), dataset)
    for n in (1, 2, 3):
        distances = angular_distances(sim, n)
        assert len(distances) == 3 - n + 1
        assert distances == [sim.angular[layer][layer + n] for layer in range(3 - n + 1)]
    assert angular_distances(sim, 3) == [sim.angular[0][3]]


@pytest.mark.parametrize("n", [0, -1, 4, 1.0, True])
def test_angular_distances_reject_bad_block_lengths(dataset, n):
    sim = hidden_state_similarity(tiny_model(layers=3), dataset, max_examples=1)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        angular_distances(sim, n)


def test_round_trips_through_json(dataset):
    sim = hidden_state_similarity(tiny_model(layers=2), dataset)
    again = LayerSimilarity.from_dict(json.loads(json.dumps(sim.to_dict())))
    assert again == sim
    assert isinstance(again.cosine, tuple) and isinstance(again.cosine[0], tuple)


def test_rejects_bad_arguments(dataset):
    model = tiny_model(layers=2)
    with pytest.raises(GlpError, match="empty"):
        hidden_state_similarity(model, dataset.select([]))
    with pytest.raises(GlpError, match="batch_size"):
        hidden_state_similarity(model, dataset, batch_size=0)
    with pytest.raises(GlpError, match="max_examples"):
        hidden_state_similarity(model, dataset, max_examples=0)
    with pytest.raises(GlpError, match="attention_mask"):
        hidden_state_similarity(model, dataset.remove_columns("attention_mask"))
