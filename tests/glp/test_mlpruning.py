"""MLPruning on tiny random models: the Top-k binariser, the adaptive regulariser, masks that
equal slicing, and a whole run meeting its budget."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from glp import GlpError
from glp.core.anatomy import encoder_layers, role_module
from glp.core.checkpoint import load_pretrained, save_pretrained
from glp.core.surgery import apply_plan
from glp.methods.mlpruning import MLPruningConfig
from glp.methods.mlpruning.prune import (
    TopK,
    WidthMasks,
    adaptive_regulariser,
    check_density,
    mask_lr_for,
    prune_width,
    shift_to_target,
)
from glp.training.config import FineTuneConfig
from glp.training.distill import distil_layers
from tests.glp.test_surgery import FAMILIES, batch, tiny_model


def toy_dataset(rows: int = 96, length: int = 10) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * rows,
                              "labels": (ids[:, 0] % 3).tolist()})


def test_topk_keeps_the_top_fraction_and_passes_gradients_straight_through():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.5], requires_grad=True)
    threshold = torch.tensor([math.log(0.5 / 0.5)], requires_grad=True)  # keep 50%: 3 of 5
    mask = TopK.apply(scores, threshold)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    (mask * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # straight through
    assert threshold.grad.item() == 1.0 + 3.0 + 5.0  # the kept structures' gradients
    assert TopK.apply(scores, torch.tensor([-50.0])).sum() == 1  # never empty


def test_regulariser_is_zero_below_target_and_adaptive_above():
    below = adaptive_regulariser(torch.tensor(0.29), 0.3, 20000)
    assert below.item() == 0.0
    far = adaptive_regulariser(torch.tensor(0.8), 0.3, 20000)
    assert far.item() == pytest.approx(20000 * 0.25 / 0.49 * 0.25)
    near = adaptive_regulariser(torch.tensor(0.31), 0.3, 20000)
    assert near.item() == pytest.approx(10 * 0.01**2, rel=1e-4)  # tiny excess: weight 10


def test_regulariser_moves_the_density_to_the_target():
    """Only the regulariser (a stand-in for the task loss) drives the thresholds."""
    model = tiny_model("bert")
    masks = WidthMasks(model, threshold_init=10.0)
    optimiser = torch.optim.Adam(masks.params, lr=0.05)
    trace = [masks.remaining().item()]
    for _ in range(500):
        optimiser.zero_grad()
        adaptive_regulariser(masks.remaining(), 0.4, 20000).backward()
        optimiser.step()
        trace.append(masks.remaining().item())
    assert trace[0] > 0.99
    assert all(b <= a + 1e-6 for a, b in zip(trace, trace[1:], strict=False))  # only down
    # It stops at the target: below it the regulariser is zero and pushes no further.
    assert trace[-1] == pytest.approx(0.4, abs=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_model_equals_the_sliced_model(family):
    model = tiny_model(family)
    masks = WidthMasks(model)
    with torch.no_grad():  # thresholds: keep about half; scores: a random order
        for group in masks.groups:
            group.threshold.fill_(0.0)
            group.scores.copy_(torch.randn(group.count))
        masked = model(**batch()).logits
    plan, _ = masks.plan(4)
    masks.remove()
    assert plan.heads and plan.neurons
    apply_plan(model, plan)
    with torch.no_grad():
        assert torch.allclose(model(**batch()).logits, masked, atol=1e-5)


def test_the_common_shift_meets_the_budget_from_either_side():
    model = tiny_model("bert")
    masks = WidthMasks(model)
    assert masks.density() == 1.0
    shift = shift_to_target(masks.density, 0.5)
    assert shift < 0 and 0.45 <= masks.density(shift) <= 0.5
    with torch.no_grad():
        for group in masks.groups:
            group.threshold.fill_(-5.0)  # training overshot: far below the target
    shift = shift_to_target(masks.density, 0.5)
    assert shift > 0 and 0.45 <= masks.density(shift) <= 0.5


def test_a_density_below_one_head_and_neuron_per_layer_is_refused():
    with pytest.raises(GlpError, match=r"density 0.01: choose a density in \[0\.\d\d, 1\]"):
        check_density(tiny_model("bert"), 0.01)
    with pytest.raises(GlpError, match="density 1.5"):
        MLPruningConfig(density=1.5)


def test_mask_lr_scales_to_the_run():
    phase = FineTuneConfig(batch_size=32, epochs=1)
    short = mask_lr_for(MLPruningConfig(density=0.3), 0.3, 320, phase)  # 10 steps
    assert short == pytest.approx(2 * (10 - math.log(0.3 / 0.7)) / 10)
    assert mask_lr_for(MLPruningConfig(density=0.3), 0.3, 10**7, phase) == 1e-2
    assert mask_lr_for(MLPruningConfig(density=0.3, mask_lr=0.05), 0.3, 320, phase) == 0.05


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta-v2"])
def test_a_run_meets_its_budget_and_reloads(family, tmp_path):
    teacher = tiny_model(family)
    model = copy.deepcopy(teacher)
    density = 0.6
    result = prune_width(model, teacher, toy_dataset(),
                         FineTuneConfig(learning_rate=1e-3, batch_size=16, epochs=1),
                         MLPruningConfig(density=density, pruning_epochs=2, final_epochs=1),
                         seed=0)
    reached = result.plan.encoder_density(teacher.config)
    assert reached <= density + 1e-9
    assert reached > density - 0.25  # coarse: 2-4 heads per layer in these tiny models
    assert set(result.stats) == {"heads+neurons", "fine-tune"}
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(**batch()).logits,
                           model.eval()(**batch()).logits)


def test_level_three_zeroes_blocks_of_the_remaining_matrices(tmp_path):
    teacher = tiny_model("bert")
    model = copy.deepcopy(teacher)
    result = prune_width(model, teacher, toy_dataset(),
                         FineTuneConfig(learning_rate=1e-3, batch_size=16, epochs=1),
                         MLPruningConfig(density=0.7, pruning_epochs=1, final_epochs=0,
                                         block_size=8, block_density=0.5, block_epochs=1),
                         seed=0)
    assert result.plan.blocks and set(result.stats) == {"heads+neurons", "blocks"}
    densities = [mask.density for mask in result.plan.blocks.values()]
    assert sum(densities) / len(densities) <= 0.5 + 1e-9
    query = role_module(model, encoder_layers(model)[0], "query")
    first = result.plan.blocks["0.query"].kept()[0]
    assert bool(torch.count_nonzero(query.weight[:8, :8])) == first
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(**batch()).logits,
                           model.eval()(**batch()).logits)


def _kl_to(teacher, student, dataset) -> float:
    ids = torch.tensor(dataset["input_ids"])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        target = torch.softmax(teacher.eval()(**inputs).logits, -1)
        log_p = torch.log_softmax(student.eval()(**inputs).logits, -1)
    return float(torch.nn.functional.kl_div(log_p, target, reduction="batchmean"))


def test_a_layer_pruned_model_distilled_from_the_teacher_moves_to_its_predictions():
    from glp.core.surgery import remove_layers
    from glp.training.train import fine_tune

    data = toy_dataset()
    config = FineTuneConfig(learning_rate=3e-3, batch_size=16, epochs=3)
    teacher = tiny_model("bert")  # a confident teacher, of labels the data does not have
    other = data.map(lambda row: {"labels": row["input_ids"][1] % 3})
    fine_tune(teacher, other, FineTuneConfig(learning_rate=3e-3, batch_size=16, epochs=6),
              seed=0)
    student = tiny_model("bert", seed=1)
    remove_layers(student, (1, 2))
    plain = copy.deepcopy(student)
    before = _kl_to(teacher, student, data)
    stats = distil_layers(student, teacher, data, config, seed=0, temperature=2.0)
    fine_tune(plain, data, config, seed=0)
    assert stats.steps == 18 and not stats.diverged  # the whole budget: 3 epochs of 6 batches
    # The teacher's predictions differ from the labels: only the distilled student learns them.
    assert _kl_to(teacher, student, data) < 0.5 * before
    assert _kl_to(teacher, student, data) < _kl_to(teacher, plain, data)
    assert all(not p.requires_grad for p in teacher.parameters())  # frozen, not trained


def test_a_layer_pruned_model_is_cut_in_width_in_its_remaining_layers(tmp_path):
    from glp.core.surgery import remove_layers

    teacher = tiny_model("bert")
    remove_layers(teacher, (1,))  # greedy first, then width: one plan
    model = copy.deepcopy(teacher)
    result = prune_width(model, teacher, toy_dataset(),
                         FineTuneConfig(learning_rate=1e-3, batch_size=16, epochs=1),
                         MLPruningConfig(density=0.6, pruning_epochs=1, final_epochs=0), seed=0)
    assert result.plan.num_layers == 4 and result.plan.removed == (1,)
    assert set(result.plan.heads) | set(result.plan.neurons) <= {0, 2, 3}
    save_pretrained(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(**batch()).logits,
                           model.eval()(**batch()).logits)


def _distillation_loss(config: MLPruningConfig, student, teacher, labelled: dict,
                       objective=None) -> tuple[float, dict]:
    from glp.methods.mlpruning.prune import Distillation, eager_attention

    objective = objective or Distillation(teacher, config)
    with eager_attention(student, teacher, on=config.attention_weight > 0), torch.no_grad():
        outputs = student(**labelled, **objective.forward_kwargs())
        loss = objective.loss(student, outputs, labelled, 0, 1)
    return loss.item(), getattr(objective, "terms", {})


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_hidden_and_attention_terms_change_the_loss_and_weight_zero_is_the_old_loss(family):
    from glp.training.distill import Distillation as Plain

    teacher, student = tiny_model(family), tiny_model(family, seed=1)
    labelled = {**batch(), "labels": torch.tensor([0, 1])}
    off = MLPruningConfig(hidden_weight=0, attention_weight=0)
    old, _ = _distillation_loss(off, student, teacher, labelled, Plain(teacher, 2.0, 0.9, 0.1))
    same, terms = _distillation_loss(off, student, teacher, labelled)
    assert same == pytest.approx(old, rel=1e-6) and set(terms) == {"logits"}
    full, terms = _distillation_loss(MLPruningConfig(), student, teacher, labelled)
    assert set(terms) == {"logits", "hidden", "attention"}
    assert terms["hidden"] > 0 and terms["attention"] > 0
    # The reference's sum: 0.9 x (KL + hidden + attention) + 0.1 x task loss.
    assert full == pytest.approx(old + 0.9 * (terms["hidden"] + terms["attention"]), rel=1e-5)
    hidden_only, _ = _distillation_loss(MLPruningConfig(attention_weight=0), student, teacher,
                                        labelled)
    assert hidden_only == pytest.approx(old + 0.9 * terms["hidden"], rel=1e-5)
    # The student's attention is restored after the eager context.
    assert student.config._attn_implementation == teacher.config._attn_implementation


def test_distillation_terms_compare_a_sliced_or_layer_pruned_student_with_its_teacher():
    from glp.core.plan import Plan
    from glp.core.surgery import remove_layers

    teacher = tiny_model("bert")
    labelled = {**batch(), "labels": torch.tensor([0, 1])}
    student = copy.deepcopy(teacher)
    apply_plan(student, Plan(num_layers=4, heads={0: (1, 3)}, neurons={}))
    _, terms = _distillation_loss(MLPruningConfig(), student, teacher, labelled)
    assert terms["hidden"] > 0 and terms["attention"] > 0  # layer 0 lost two heads
    pruned = copy.deepcopy(teacher)
    remove_layers(pruned, (1, 2))  # an unpruned teacher: layers 0 and 3 correspond
    _, terms = _distillation_loss(MLPruningConfig(), pruned, teacher, labelled)
    assert terms["hidden"] > 0
    # Layer 0 is the teacher's own: its attention is equal, layer 3's sees other inputs.
    assert terms["attention"] > 0


def _half_masks(model) -> WidthMasks:
    """Masks that keep about half of every group, in a random order."""
    masks = WidthMasks(model)
    with torch.no_grad():
        for group in masks.groups:
            group.threshold.fill_(0.0)
            group.scores.copy_(torch.randn(group.count))
    return masks


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta-v2"])
def test_a_pruned_head_loses_its_query_key_and_value(family):
    from glp.core.anatomy import head_projections, head_size

    model = tiny_model(family)
    masks = _half_masks(model)
    layer, size = encoder_layers(model)[0], head_size(model)
    seen = {}
    for projection in head_projections(model, layer):  # after the masks' hooks: masked
        projection.register_forward_hook(
            lambda module, args, output, p=projection: seen.__setitem__(p, output))
    with torch.no_grad():
        model(**batch())
    heads = next(g for g in masks.groups if g.layer == 0 and g.kind == "heads")
    kept = heads.kept()
    assert 0 < len(kept) < heads.count and len(seen) >= 3  # query, key, value at least
    for output in seen.values():
        per_head = output.view(*output.shape[:-1], heads.count, size)
        for head in range(heads.count):
            assert bool(per_head[..., head, :].abs().sum() > 0) == (head in kept)


def test_an_ffn_neuron_is_masked_before_the_activation():
    model = tiny_model("bert")
    masks = _half_masks(model)
    layer = encoder_layers(model)[0]
    seen = {}
    role_module(model, layer, "ffn_in").register_forward_hook(
        lambda module, args, output: seen.__setitem__("ffn_in", output))
    with torch.no_grad():
        model(**batch())
    neurons = next(g for g in masks.groups if g.layer == 0 and g.kind == "neurons")
    kept = set(neurons.kept())
    pruned = [n for n in range(neurons.count) if n not in kept]
    assert pruned and kept
    assert seen["ffn_in"][..., pruned].abs().sum() == 0  # zero before GELU: GELU(0) = 0
    assert seen["ffn_in"][..., sorted(kept)].abs().sum() > 0
    # The scores learn through the pre-activation outputs (straight through the Top-k).
    model(**batch()).logits.sum().backward()
    assert neurons.scores.grad is not None and neurons.scores.grad.abs().sum() > 0


def _context(model, **kwargs):
    from glp.methods import Context

    return Context(model=model, config=FineTuneConfig(learning_rate=1e-3, batch_size=16,
                                                      epochs=1),
                   seed=0, load_train=toy_dataset, **kwargs)


def test_init_pretrained_starts_from_the_pretrained_model_taught_by_the_given_one():
    from glp.methods import get_method
    from glp.methods.mlpruning.prune import run

    assert "pretrained" in get_method("mlpruning").needs
    config = MLPruningConfig(density=0.7, pruning_epochs=1, final_epochs=0, init="pretrained")
    fine_tuned, pretrained = tiny_model("bert"), tiny_model("bert", seed=1)
    start = copy.deepcopy(pretrained)
    teacher_before = copy.deepcopy(fine_tuned.state_dict())
    outcome = run(_context(fine_tuned, pretrained=lambda: pretrained,
                           teacher=lambda: pytest.fail("the given model is the teacher")),
                  config)
    assert outcome.model is pretrained and not outcome.diverged
    assert all(torch.equal(v, fine_tuned.state_dict()[k]) for k, v in teacher_before.items())
    # Other starting weights than the teacher's: the pre-trained model's, then trained.
    layer = encoder_layers(start)[0]
    assert not torch.equal(role_module(start, layer, "query").weight,
                           role_module(fine_tuned, encoder_layers(fine_tuned)[0],
                                       "query").weight)
    with torch.no_grad():
        assert not torch.allclose(outcome.model(**batch()).logits,
                                  fine_tuned(**batch()).logits)
    # init=teacher (the default) trains the given model, taught by a copy.
    given = tiny_model("bert")
    outcome = run(_context(given, teacher=lambda: tiny_model("bert")),
                  MLPruningConfig(density=0.7, pruning_epochs=1, final_epochs=0))
    assert outcome.model is given


def test_init_pretrained_without_a_pretrained_model_is_refused():
    from glp.methods.mlpruning.prune import run

    with pytest.raises(GlpError, match="init=pretrained needs the pre-trained model"):
        run(_context(tiny_model("bert")), MLPruningConfig(init="pretrained"))
    with pytest.raises(GlpError, match="init"):
        MLPruningConfig(init="random")
