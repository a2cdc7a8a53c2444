"""Post-training pruning (Kwon et al. 2022) on tiny random models: the budget, the folding,
the mask search, the rearrangement and the least-squares tuning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from glp import GlpError
from glp.core.surgery import apply_plan, remove_layers
from glp.methods import Context, get_method
from glp.methods.post_training import PostTrainingParams
from glp.methods.post_training.prune import (
    Masked,
    check,
    fold,
    mac_fraction,
    mac_per_head,
    mac_per_neuron,
    mask_gradients,
    plan_of,
    rearrange,
    run,
    search,
    tune_layer,
)
from glp.training.config import FineTuneConfig
from glp.training.data import collate
from tests.glp.test_surgery import FAMILIES, batch, tiny_model


def dataset(rows: int = 64, length: int = 10, labels: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (rows, length), generator=generator)
    mask = [[1] * (length - i % 4) + [0] * (i % 4) for i in range(rows)]
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask,
                              "labels": (ids[:, 0] % labels).tolist()})


def context(model, rows: int = 64) -> Context:
    data = dataset(rows, labels=model.config.num_labels)
    return Context(model=model, config=FineTuneConfig(batch_size=16), seed=0,
                   load_train=lambda: data)


def logits(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or batch())).logits


def test_parameters_are_checked_with_the_option_named():
    with pytest.raises(GlpError, match="constraint 0: choose a fraction in"):
        PostTrainingParams(constraint=0)
    with pytest.raises(GlpError, match="samples 0"):
        PostTrainingParams(samples=0)
    spec = get_method("post-training")
    assert spec.budget == "constraint" and spec.family == "width"
    assert spec.label(PostTrainingParams(constraint=0.6)) == "constraint-60"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_folded_and_sliced_model_computes_the_masked_one(family):
    model = tiny_model(family)
    masked = Masked(model)
    generator = torch.Generator().manual_seed(1)
    masked.heads = torch.rand(masked.heads.shape, generator=generator) + 0.5
    masked.neurons = torch.rand(masked.neurons.shape, generator=generator) + 0.5
    masked.heads[0, 0] = 0.0
    masked.neurons[:, ::2] = 0.0
    expected = logits(model)
    heads, neurons = masked.heads.clone(), masked.neurons.clone()
    masked.remove()
    fold(model, heads, neurons)
    plan = plan_of(model, heads, neurons)
    before = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters()) < before
    assert torch.allclose(logits(model), expected, atol=1e-5)


def test_the_search_meets_the_budget_and_keeps_the_most_fisher_information():
    generator = torch.Generator().manual_seed(0)
    heads, neurons = torch.rand(3, 4, generator=generator), torch.rand(3, 20, generator=generator)
    head_mac, neuron_mac = 10.0, 1.0  # a head costs ten neurons
    full = 3 * 4 * head_mac + 3 * 20 * neuron_mac
    for constraint in (0.2, 0.5, 0.8, 1.0):
        head_mask, neuron_mask = search(heads, neurons, constraint, head_mac, neuron_mac)
        cost = head_mask.sum() * head_mac + neuron_mask.sum() * neuron_mac
        assert cost <= constraint * full + 1e-6
        assert (head_mask.sum(1) >= 1).all() and (neuron_mask.sum(1) >= 1).all()
    head_mask, neuron_mask = search(heads, neurons, 1.0, head_mac, neuron_mac)
    assert head_mask.all() and neuron_mask.all()
    # Within a kept count, the most important structures are the kept ones.
    head_mask, _ = search(heads, neurons, 0.5, head_mac, neuron_mac)
    dropped = heads[head_mask == 0]
    kept_free = heads[(head_mask == 1) & (heads < heads.max(dim=1, keepdim=True).values)]
    if len(dropped) and len(kept_free):
        assert dropped.max() <= kept_free.min()
    with pytest.raises(GlpError, match="constraint"):
        search(heads, neurons, 0.01, head_mac, neuron_mac)


def test_rearrangement_never_raises_the_block_diagonal_loss_estimate():
    """The block-diagonal Fisher's estimate of the loss a pruned set costs is the squared
    norm of its summed gradient vectors; the greedy rearrangement lowers it or keeps it."""
    generator = torch.Generator().manual_seed(0)
    for seed in range(5):
        grads = torch.randn(8, 12, generator=generator)  # batches x structures
        grads[:, 3] = -grads[:, 4]  # two structures whose removals cancel
        mask = torch.ones(12)
        mask[grads.pow(2).sum(0).argsort()[:5]] = 0.0  # the diagonal choice

        def cost(m, grads=grads):
            return float(grads[:, m == 0].sum(dim=1).pow(2).sum())

        new = rearrange(mask.clone(), grads)
        assert new.sum() == mask.sum()
        assert cost(new) <= cost(mask) + 1e-5, seed


def test_least_squares_lower_each_layers_reconstruction_error():
    model = tiny_model("bert")
    ctx = context(model)
    masked = Masked(model)
    batches = [collate(ctx.train, range(i, i + 16), 0) for i in range(0, 64, 16)]
    head_grads, neuron_grads = mask_gradients(model, masked, batches)
    fisher = head_grads.pow(2).sum(0), neuron_grads.pow(2).sum(0)
    macs = mac_per_head(10, 32, 8), mac_per_neuron(10, 32)  # the tiny BERT's shapes
    teacher = search(*fisher, math.sqrt(0.5), *macs)
    student = search(*fisher, 0.5, *macs)
    assert not student[0].all() and not student[1].all()
    for layer in range(len(student[0])):
        heads, neurons, errors, finished = tune_layer(model, masked, batches, layer, teacher,
                                                      student, cls_only=False)
        assert finished
        assert errors["ffn_after"] < errors["ffn_before"]
        if layer:
            assert errors["attention_after"] < errors["attention_before"]
        assert ((heads == 0) == (student[0] == 0)).all()  # the kept set stays the same
        student = (heads, neurons)
    masked.remove()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_the_method_prunes_to_the_budget_and_the_plan_reloads(family, tmp_path):
    from glp.core.checkpoint import load_pretrained, save_pretrained

    model = tiny_model(family)
    before = sum(p.numel() for p in model.parameters())
    outcome = run(context(model), PostTrainingParams(constraint=0.5))
    assert outcome.details["mac_kept"] <= 0.5
    assert outcome.details["reconstruction_error_after"] <= (
        outcome.details["reconstruction_error_before"])
    assert outcome.plan.heads or outcome.plan.neurons
    assert sum(p.numel() for p in outcome.model.parameters()) < before
    assert [p["phase"] for p in outcome.phases] == ["mask search", "mask tuning"]
    assert not any("examples" in p for p in outcome.phases)  # no training on the task
    expected = logits(outcome.model)
    save_pretrained(outcome.model, tmp_path / "m")
    assert torch.allclose(logits(load_pretrained(tmp_path / "m")), expected, atol=1e-5)


def test_a_constraint_of_one_keeps_every_head_and_neuron():
    model = tiny_model("bert")
    expected = logits(copy.deepcopy(model))
    outcome = run(context(model), PostTrainingParams(constraint=1.0, rescale=False))
    assert not outcome.plan.heads and not outcome.plan.neurons
    assert torch.allclose(logits(outcome.model), expected, atol=1e-5)


def test_it_composes_after_layer_pruning_with_original_layer_indices():
    model = remove_layers(tiny_model("bert"), [1])
    outcome = run(context(model), PostTrainingParams(constraint=0.4))
    assert outcome.plan.removed == (1,)
    assert set(outcome.plan.heads) | set(outcome.plan.neurons) <= {0, 2, 3}


def test_a_model_cut_in_width_or_a_budget_too_small_is_refused():
    model = tiny_model("bert")
    with pytest.raises(GlpError, match="constraint 0.001"):
        check(model, PostTrainingParams(constraint=0.001))
    outcome = run(context(model), PostTrainingParams(constraint=0.5, rescale=False))
    with pytest.raises(GlpError, match="whole heads and FFN neurons"):
        check(outcome.model, PostTrainingParams(constraint=0.5))


def test_the_mac_count_weighs_heads_and_neurons():
    heads, neurons = torch.ones(2, 4), torch.ones(2, 10)
    assert mac_fraction(heads, neurons, 16, 32, 8) == 1.0
    heads[0] = 0
    assert 0 < mac_fraction(heads, neurons, 16, 32, 8) < 1
