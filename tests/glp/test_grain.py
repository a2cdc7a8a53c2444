"""GRAIN on tiny random models: uneven heads that equal the masked model, the schedule, the
EMA, gradient separation, the head-structure regulariser, and whole runs that meet their
budget, save, reload and export."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from glp import GlpError
from glp.core.anatomy import encoder_layers
from glp.core.checkpoint import load_pretrained, read_plan, save_pretrained
from glp.core.plan import Plan
from glp.core.surgery import apply_plan
from glp.deploy.export import export_onnx, onnx_logits
from glp.methods import ParamError, get_method
from glp.methods.grain import GrainConfig
from glp.methods.grain.prune import (
    DimMasks,
    GrainObjective,
    check_density,
    ema,
    matching_layers,
    prune,
    schedule,
)
from glp.training.config import FineTuneConfig
from tests.glp.test_mlpruning import toy_dataset
from tests.glp.test_surgery import FAMILIES, batch, n_params, tiny_model

HEADS, SIZE = 4, 8  # the tiny models' attention


def spread_weights(model, seed: int = 3) -> None:
    """Weights large enough that attention matters (the tiny models' 0.02 init makes every
    head nearly uniform, and an equivalence test would pass for the wrong reasons)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" not in name and "layer_norm" not in name:
                param.normal_(0, 0.3)


def random_masks(masks: DimMasks, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for kind in masks.KINDS:
        masks.masks[kind] = (torch.rand(masks.masks[kind].shape, generator=generator) > 0.5).float()
    masks.masks["vo"][1, :SIZE] = 0  # layer 1 loses head 0
    masks.masks["vo"][:, SIZE + 4] = 1  # every layer keeps a value dimension ...
    masks.masks["ffn"][:, 0] = 1  # ... and a neuron
    masks.masks["qk"][2, SIZE: 2 * SIZE] = 0  # head 1 of layer 2: values but no query/key
    heads = masks.masks["vo"].view(-1, HEADS, SIZE).amax(-1, keepdim=True)
    masks.masks["qk"].view(-1, HEADS, SIZE).mul_(heads)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


def assert_round_trip(model, tmp_path) -> None:
    """Saved, reloaded with load_pretrained (the same logits) and exported to ONNX (1e-4)."""
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert torch.equal(logits(loaded), logits(model))
    path = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    actual = onnx_logits(path, {k: v.numpy() for k, v in batch().items()})
    np.testing.assert_allclose(actual, logits(loaded).numpy(), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_uneven_heads_equal_the_masked_model_and_round_trip(family, tmp_path):
    model = tiny_model(family, layers=3)
    spread_weights(model)
    full = logits(model)
    masks = DimMasks(model)
    random_masks(masks)
    masked = logits(model)
    assert (masked - full).abs().max() > 0.1  # the masks change the model
    masks.remove()
    plan = masks.plan(3)
    assert plan.kind == "dims+neurons"
    before = n_params(model)
    apply_plan(model, plan)
    assert torch.allclose(logits(model), masked, atol=1e-5)
    # physically smaller, by exactly the masked structures' parameters
    assert before - n_params(model) == round((1 - masks.density()) * masks.base)
    assert plan.parameter_counts(model.config)["parameters"] == n_params(model)
    assert_round_trip(model, tmp_path)
    assert read_plan(tmp_path / "m") == plan


def test_a_head_with_values_but_no_query_key_attends_uniformly():
    model = tiny_model("bert", layers=1)
    spread_weights(model)
    qk = tuple(range(SIZE))  # only head 0 keeps query/key dimensions
    plan = Plan(1, qk={0: qk})
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the masked model: head 1's query and key rows zeroed
        attention = encoder_layers(reference)[0].attention.self
        for linear in (attention.query, attention.key):
            linear.weight[SIZE:] = 0
            linear.bias[SIZE:] = 0
    apply_plan(model, plan)
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)


def test_the_cubic_schedule():
    config = GrainConfig(density=0.1, start=0.2, end=0.4)
    values = [schedule(step, 100, config, 0.1) for step in (0, 20, 21, 30, 39, 40, 41, 100)]
    assert values[:2] == [1.0, 1.0]  # before the window
    assert values[2] == pytest.approx(0.1 + 0.9 * (1 - 1 / 20) ** 3)
    assert values[3] == pytest.approx(0.1 + 0.9 * 0.5**3)
    assert values[4] == pytest.approx(0.1 + 0.9 * (1 / 20) ** 3)
    assert values[5:] == [0.1, 0.1, 0.1]  # the target from the end of the window on
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_the_moving_average():
    previous, update = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 10.0])
    assert torch.allclose(ema(previous, update, 0.998), torch.tensor([0.998, 0.02]))
    masks = DimMasks(tiny_model("bert", layers=2))
    masks.updates["ffn"].fill_(5.0)
    masks.update(beta=0.9, head_alpha=0.3, alpha=1e-4)
    assert torch.allclose(masks.scores["ffn"], torch.full_like(masks.scores["ffn"], 0.5))
    assert masks.updates["ffn"].abs().sum() == 0  # consumed


def test_the_head_regulariser_damps_the_dimensions_of_emptying_heads():
    masks = DimMasks(tiny_model("bert", layers=1))
    masks.masks["vo"][0, : SIZE // 2] = 0  # head 0 half gone, head 1 whole
    masks.updates["vo"].fill_(1.0)
    masks.update(beta=0.0, head_alpha=0.3, alpha=1e-4)
    scores = masks.scores["vo"][0]
    assert scores[SIZE // 2].item() == pytest.approx(math.tanh(0.5 / 0.3))
    assert scores[SIZE].item() == pytest.approx(math.tanh(1 / 0.3))
    assert torch.isinf(scores[: SIZE // 2]).all()  # pruned stays pruned


def test_pruning_is_global_monotone_meets_the_target_and_keeps_the_floors():
    masks = DimMasks(tiny_model("bert", layers=3))
    generator = torch.Generator().manual_seed(0)
    for kind in masks.KINDS:
        masks.scores[kind] = torch.rand(masks.scores[kind].shape, generator=generator)
    masks.prune_to(0.5)
    kept = {k: masks.masks[k].clone() for k in masks.KINDS}
    variable = sum(masks.unit[k] * float(masks.masks[k].sum()) for k in masks.KINDS)
    assert variable / masks.variable <= 0.5
    masks.scores = {k: torch.rand(v.shape, generator=generator).where(
        masks.masks[k] > 0, torch.tensor(-math.inf)) for k, v in masks.scores.items()}
    masks.prune_to(0.0)  # everything it may
    for kind in masks.KINDS:
        assert (masks.masks[kind] <= kept[kind]).all()  # never un-pruned
    assert (masks.masks["vo"].sum(-1) == 1).all() and (masks.masks["ffn"].sum(-1) == 1).all()
    masks.remove()
    check_density(tiny_model("bert", layers=3), masks.density())  # the floor is allowed
    with pytest.raises(GlpError, match="density 0.001: choose a density in"):
        check_density(tiny_model("bert", layers=3), 0.001)


def test_gradient_separation_keeps_the_hidden_loss_out_of_the_scores():
    """The same batch with a hidden-state loss 1x and 1000x: the scores are the same when
    separated, and differ when the losses are summed first (so the test can fail)."""
    data = toy_dataset(8)
    finetune = FineTuneConfig(batch_size=8, epochs=1, learning_rate=1e-3)

    def scores(hidden_weight: float, separate: bool) -> torch.Tensor:
        teacher = tiny_model("bert", layers=2, seed=1)
        model = tiny_model("bert", layers=2, seed=2)
        masks = DimMasks(model)
        config = GrainConfig(hidden_weight=hidden_weight, gradient_separation=separate,
                             embedding_rank=0)
        objective = GrainObjective(teacher, model, masks, config, finetune)
        with torch.no_grad():  # maps that make the hidden loss depend on the weights
            for linear in objective.maps:
                linear.weight.mul_(3.0)
        rows = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
        model.train()
        outputs = model(**rows, **objective.forward_kwargs())
        parts = objective.losses(model, outputs, rows, 0, 10)
        for number, part in enumerate(parts):
            part.backward(retain_graph=number + 1 < len(parts))
            objective.after_backward(model, number, len(parts), 0, 10)
        return torch.cat([masks.scores[k].view(-1) for k in masks.KINDS])

    separated = scores(1.0, True)
    assert separated.abs().sum() > 0
    assert torch.equal(scores(1000.0, True), separated)
    assert not torch.allclose(scores(1000.0, False), scores(1.0, False))


def test_matching_layers():
    assert matching_layers(12) == [0, 2, 4, 6, 8, 10, 12]
    assert matching_layers(6) == [0, 2, 4, 6]
    assert matching_layers(3) == [0, 2, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_run_meets_its_density_and_the_model_reloads(family, tmp_path):
    teacher = tiny_model(family, layers=2)
    model = copy.deepcopy(teacher)
    config = GrainConfig(density=0.4, epochs=2, embedding_rank=8)
    result = prune(model, teacher, toy_dataset(48), FineTuneConfig(batch_size=8, epochs=2,
                                                                   learning_rate=1e-3),
                   config, seed=0)
    assert not result.stats["grain"].diverged
    density = result.plan.encoder_density(teacher.config)
    assert density <= 0.4 and density == pytest.approx(result.density_reached)
    assert density > 0.3  # close to the target, not far below it
    assert result.plan.ranks == {"embeddings": 8}
    assert result.plan.parameter_counts(teacher.config)["parameters"] == n_params(model)
    assert_round_trip(model, tmp_path)


@pytest.mark.parametrize("changes, param, fragment", [
    ({"density": 0}, "density", "density 0: choose a fraction"),
    ({"start": 0.5, "end": 0.3}, "end",
     r"end 0.3: choose a fraction from the pruning start \(0.5\)"),
    ({"beta": 1.0}, "beta", "beta 1.0: choose in \\[0, 1\\)"),
    ({"temperature": -1.0}, "temperature", "temperature -1.0"),
    ({"head_alpha": 0.0}, "head_alpha", "head_alpha 0.0"),
    ({"kd_weight": 0.0}, "kd_weight", "kd_weight 0: .*hard-label weight is 0"),
    ({"epochs": math.nan}, "epochs", "epochs nan"),
])
def test_bad_settings_are_refused_naming_the_parameter(changes, param, fragment):
    """The library names its own parameter; the CLI maps it to the option (tested there)."""
    with pytest.raises(ParamError, match=fragment) as caught:
        GrainConfig(**changes)
    assert caught.value.param == param
    option = get_method("grain").options()
    typed = next(name for name, f in option.items() if f.name == param)
    assert caught.value.for_option(f"--{typed}").startswith(f"--{typed} ")


def test_dimension_plans_validate_serialise_and_compose():
    plan = Plan(4, removed=(3,), neurons={0: (1, 2)}, qk={0: (), 1: (0, 5)}, vo={1: (3,)})
    assert Plan.from_json(plan.to_json()) == plan
    assert "qk" not in Plan(4).to_dict()  # old plans hash as before
    with pytest.raises(GlpError, match="layer 1 keeps no value/output dimension"):
        Plan(4, vo={1: ()})
    with pytest.raises(GlpError, match="dimensions name layer 3, which the plan does not keep"):
        Plan(4, removed=(3,), qk={3: (1,)})
    with pytest.raises(GlpError, match="both kept heads and kept dimensions"):
        Plan(4, heads={0: (1,)}, vo={0: (1,)})
    with pytest.raises(GlpError, match="cannot also have its attention matrices"):
        Plan(4, vo={0: (1,)}).offline({"0.value": 2})
    with pytest.raises(GlpError, match="rank 'x.query': name it"):
        Plan(4, vo={0: (1,)}, ranks={"x.query": 2})
    layers_then_dims = Plan.layers(4, [2]).compose(Plan(4, qk={1: (0, 1)}, vo={2: (4,)}))
    assert layers_then_dims.removed == (2,) and layers_then_dims.vo == {}
    assert layers_then_dims.qk == {1: (0, 1)}
    with pytest.raises(GlpError, match="does not exist"):
        apply_plan(tiny_model("bert", layers=4), Plan(4, vo={0: (99,)}))


def test_a_batch_with_a_non_finite_gradient_adds_no_score_to_any_layer():
    model = tiny_model("bert", layers=2)
    masks = DimMasks(model)
    for layer in masks.layers:  # finite gradients everywhere ...
        for linear in (layer.ffn_out, layer.query, layer.output):
            linear.weight.grad = torch.ones_like(linear.weight)
        layer.query.bias.grad = torch.ones_like(layer.query.bias)
    masks.layers[1].output.weight.grad[0, 0] = math.nan  # ... but one, in the last layer
    masks.gather()
    assert all(u.abs().sum() == 0 for u in masks.updates.values())


def test_grain_refuses_a_model_already_cut_in_width():
    model = tiny_model("bert", layers=2)
    apply_plan(model, Plan(2, neurons={0: (0, 1)}))
    with pytest.raises(GlpError, match="GRAIN starts from the unpruned model"):
        DimMasks(model)


def test_a_layer_without_query_key_dimensions_saves_reloads_and_exports(tmp_path):
    model = tiny_model("deberta-v2", layers=2)
    spread_weights(model)
    apply_plan(model, Plan(2, qk={0: ()}, vo={0: (1, 9, 10)}))
    assert_round_trip(model, tmp_path)


def test_dimensions_then_low_rank_ffn_is_one_plan_that_round_trips(tmp_path):
    from glp.methods.lowrank.svd import ranks_for_ratio

    model = tiny_model("bert", layers=2)
    width = Plan(2, qk={0: (0, 1, 9)}, vo={0: (1, 9)}, neurons={1: (0, 3, 4)})
    apply_plan(model, width)
    plan = width.offline(ranks_for_ratio(model, ("ffn_in", "ffn_out"), 2))
    apply_plan(model, plan)
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert read_plan(tmp_path / "m") == plan
    assert torch.equal(logits(loaded), logits(model))


def test_the_optimiser_gets_the_reference_s_eps_weight_decay_and_warm_up(monkeypatch):
    """AdamW with GRAIN's eps and weight decay (not on biases and LayerNorms), and a linear
    warm-up over GRAIN's fraction of the steps, whatever the job's fine-tune config says."""
    import transformers

    import glp.training.train as train

    seen = {}
    build, warm = train._optimizer, transformers.get_linear_schedule_with_warmup

    def optimizer(model, config, **options):
        seen["optimizer"] = build(model, config, **options)
        return seen["optimizer"]

    def scheduler(optim, warmup, steps):
        seen["warmup"], seen["steps"] = warmup, steps
        return warm(optim, warmup, steps)

    monkeypatch.setattr(train, "_optimizer", optimizer)
    monkeypatch.setattr(transformers, "get_linear_schedule_with_warmup", scheduler)
    teacher = tiny_model("bert", layers=2)
    config = GrainConfig(density=0.5, epochs=5, embedding_rank=0, warmup=0.2,
                         weight_decay=0.03, adam_epsilon=1e-5)
    prune(copy.deepcopy(teacher), teacher, toy_dataset(16), FineTuneConfig(batch_size=8),
          config, seed=0)
    groups = seen["optimizer"].param_groups
    assert {g["eps"] for g in groups} == {1e-5}
    assert [g["weight_decay"] for g in groups[:2]] == [0.03, 0.0]
    assert seen["steps"] == 10 and seen["warmup"] == 2
    defaults = GrainConfig()
    assert (defaults.warmup, defaults.weight_decay, defaults.adam_epsilon) == (0.1, 0.01, 1e-6)


def _context(teacher, pretrained, dataset):
    from glp.methods import Context

    return Context(model=copy.deepcopy(teacher), config=FineTuneConfig(batch_size=8),
                   seed=0, teacher=lambda: copy.deepcopy(teacher),
                   pretrained=lambda: copy.deepcopy(pretrained),
                   load_train=lambda: dataset)


def test_init_pretrained_starts_the_student_from_the_pretrained_weights(monkeypatch):
    """init=pretrained trains the pre-trained model (the reference's student) against the
    fine-tuned model as the teacher; init=teacher trains a copy of the teacher."""
    import glp.methods.grain.prune as grain

    teacher, pretrained = tiny_model("bert", layers=2), tiny_model("bert", layers=2)
    with torch.no_grad():
        for param in pretrained.parameters():
            param.add_(1.0)
    started = {}

    def recording(model, teacher_model, *args, **kwargs):
        started["student"] = copy.deepcopy(model.state_dict())
        started["teacher"] = copy.deepcopy(teacher_model.state_dict())
        return real(model, teacher_model, *args, **kwargs)

    real = grain.prune
    monkeypatch.setattr(grain, "prune", recording)
    config = dict(density=0.5, epochs=1, embedding_rank=0)
    for init, expected in (("pretrained", pretrained), ("teacher", teacher)):
        context = _context(teacher, pretrained, toy_dataset(16))
        outcome = grain.run(context, GrainConfig(init=init, **config))
        for name, value in expected.state_dict().items():
            assert torch.equal(started["student"][name], value), (init, name)
        for name, value in teacher.state_dict().items():
            assert torch.equal(started["teacher"][name], value), (init, name)
        assert (outcome.model is context.model) == (init == "teacher")
    assert "pretrained" in get_method("grain").needs


def test_init_pretrained_without_a_pretrained_model_is_refused():
    from glp.methods import Context

    teacher = tiny_model("bert", layers=2)
    context = Context(model=teacher, config=FineTuneConfig(), seed=0,
                      load_train=lambda: toy_dataset(8))
    with pytest.raises(GlpError, match="init=pretrained needs the pre-trained model"):
        get_method("grain").implementation()(context, GrainConfig(init="pretrained"))
    with pytest.raises(ParamError, match="init 'student'"):
        GrainConfig(init="student")


def test_the_grouped_layout_holds_every_kept_row_once_in_few_groups():
    from glp.core.attention import grouped_layout

    generator = torch.Generator().manual_seed(0)
    heads, size = 12, 32
    for bucket, max_groups in ((8, 2), (8, 3), (4, 5), (32, 1)):
        keep = torch.rand(heads * size, generator=generator)
        qk = [d for d in range(heads * size) if keep[d] < 0.3]
        vo = [d for d in range(heads * size) if keep[d] > 0.4 and d // size != 5]
        plan = grouped_layout(qk, vo, heads, size, bucket=bucket, max_groups=max_groups)
        assert 5 not in plan["heads"] and len(plan["heads"]) == heads - 1
        assert 1 <= len(plan["groups"]) <= max_groups
        assert sum(count for count, _, _ in plan["groups"]) == len(plan["heads"])
        for kind, position in (("qk", 1), ("vo", 2)):
            rows, index = plan[kind]
            assert len(index) == sum(g[0] * g[position] for g in plan["groups"])
            real = [i for i in index if i != len(rows)]
            assert sorted(real) == list(range(len(rows)))  # every compact row, once
            for _, *widths in plan["groups"]:
                assert widths[position - 1] % bucket == 0 or widths[position - 1] == size
        # the compact rows are the padded layout's: a checkpoint holds the same matrices
        from glp.core.attention import layout
        assert plan["qk"][0] == layout(qk, vo, heads, size)["qk"][0]


def grouping_model():
    """A BERT with 3 heads of 32 (widths that fall into more than one group)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=96, num_hidden_layers=2,
                        num_attention_heads=3, intermediate_size=40,
                        max_position_embeddings=64, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    spread_weights(model)
    return model


UNEVEN = Plan(2, qk={0: (0, 1, 2, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 64),
                     1: tuple(range(40, 60))},
              vo={0: (3, 4, 40, *range(64, 96)), 1: (0, 1, 2, 3, 50, 70, 71)})


def test_bert_like_uneven_heads_run_in_groups_with_no_scatter(tmp_path):
    import onnx

    from glp.core.attention import GroupedSelfAttention, ScatterLinear

    model = grouping_model()
    reference = copy.deepcopy(model)
    masks = DimMasks(reference)
    for kind, kept in (("qk", UNEVEN.qk), ("vo", UNEVEN.vo)):
        masks.masks[kind].zero_()
        for layer, dims in kept.items():
            masks.masks[kind][layer, list(dims)] = 1
    masked = logits(reference)
    apply_plan(model, UNEVEN)
    attention = encoder_layers(model)[0].attention.self
    assert isinstance(attention, GroupedSelfAttention) and len(attention.groups) == 2
    assert not any(isinstance(m, ScatterLinear) for m in model.modules())
    assert torch.allclose(logits(model), masked, atol=1e-5)
    assert_round_trip(model, tmp_path)
    graph = export_onnx(tmp_path / "m", tmp_path / "int8.onnx", int8=True)
    ops = [node.op_type for node in onnx.load(str(graph)).graph.node]
    assert "ScatterElements" not in ops and "Pad" not in ops
    # every projection is an int8 product: the gathered weights were folded into constants
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") >= 2 * 6


def test_deberta_keeps_the_padded_layout():
    from glp.core.attention import ScatterLinear

    model = tiny_model("deberta-v2", layers=2)
    apply_plan(model, Plan(2, qk={0: (0, 1, 9)}, vo={0: (1, 9)}))
    assert isinstance(encoder_layers(model)[0].attention.self.query_proj, ScatterLinear)


def test_grouped_heads_train_and_see_their_new_weights():
    model = grouping_model()
    apply_plan(model, UNEVEN)
    before = logits(model)  # eval, no autograd: the gathered weights are kept
    model.train()
    inputs = batch()
    loss = model(**inputs, labels=torch.tensor([0, 2])).loss
    loss.backward()
    query = encoder_layers(model)[0].attention.self.query
    assert query.weight.grad is not None and query.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 0.1 * param.grad
    model.eval()
    after = logits(model)
    assert not torch.allclose(before, after)
    fresh = copy.deepcopy(model)  # nothing kept from before the step
    for module in fresh.modules():
        if hasattr(module, "_cache"):
            module._cache = None
    assert torch.equal(logits(fresh), after)
