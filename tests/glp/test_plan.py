"""Compression plans on tiny random models of every family: slicing equals masking, save and
``load_pretrained`` round-trip, ONNX matches PyTorch, hashes and parameter counts are right."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from glp import GlpError
from glp.core.anatomy import encoder_layers, head_size, num_heads, role_module
from glp.core.checkpoint import load_pretrained, read_plan, save_pretrained
from glp.core.plan import PLAN_FILE, BlockMask, Plan
from glp.core.surgery import apply_plan, prune_linear, remove_layers
from glp.deploy.export import export_onnx, onnx_logits
from tests.glp.test_surgery import FAMILIES, batch, n_params, tiny_model


def width_plan(model, layers: int = 4) -> Plan:
    """Uneven heads and neurons per layer, one layer removed, one layer untouched."""
    heads = num_heads(model)
    neurons = role_module(model, encoder_layers(model)[0], "ffn_in").out_features
    return Plan(layers, removed=(2,), heads={0: (heads - 1,), 3: tuple(range(0, heads, 2))},
                neurons={0: (0, 5, 7), 1: tuple(range(0, neurons, 3))})


def masked_copy(model, plan: Plan):
    """The model with the plan's pruned heads and neurons zeroed (value rows and bias of a
    head, FFN-output columns of a neuron): what slicing must compute."""
    masked = copy.deepcopy(model)
    size, heads = head_size(masked), num_heads(masked)
    with torch.no_grad():
        for layer_index, layer in enumerate(encoder_layers(masked)):
            value = role_module(masked, layer, "value")
            for head in range(heads):
                if layer_index in plan.heads and head not in plan.heads[layer_index]:
                    value.weight[head * size:(head + 1) * size] = 0
                    value.bias[head * size:(head + 1) * size] = 0
            if layer_index in plan.neurons:
                ffn_out = role_module(masked, layer, "ffn_out")
                drop = torch.ones(ffn_out.in_features, dtype=torch.bool)
                drop[list(plan.neurons[layer_index])] = False
                ffn_out.weight[:, drop] = 0
    return remove_layers(masked, plan.removed)


def logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or batch())).logits


def test_prune_linear_keeps_the_chosen_rows_and_columns():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 6)
    rows = prune_linear(linear, [1, 4], dim=0)
    cols = prune_linear(linear, [0, 3], dim=1)
    x = torch.randn(3, 4)
    assert rows.weight.shape == (2, 4) and cols.weight.shape == (6, 2)
    assert torch.allclose(rows(x), linear(x)[:, [1, 4]])
    assert torch.allclose(cols(x[:, [0, 3]]), x[:, [0, 3]] @ linear.weight[:, [0, 3]].T
                          + linear.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_model_equals_masked_model(family):
    model = tiny_model(family)
    plan = width_plan(model)
    expected = logits(masked_copy(model, plan))
    apply_plan(model, plan)
    assert torch.allclose(logits(model), expected, atol=1e-5)
    assert len(encoder_layers(model)) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_pretrained_rebuild_uneven_widths(family, tmp_path):
    model = apply_plan(tiny_model(family), width_plan(tiny_model(family)))
    save_pretrained(model, tmp_path)
    assert read_plan(tmp_path) == model.glp_plan
    loaded = load_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert n_params(loaded) == n_params(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_matches_pytorch(family, tmp_path):
    model = apply_plan(tiny_model(family), width_plan(tiny_model(family)))
    save_pretrained(model, tmp_path / "model")
    path = export_onnx(tmp_path / "model", tmp_path / "model.onnx")
    inputs = batch()
    # a longer, bigger batch than the export's example: the axes are dynamic
    inputs = {k: torch.cat([v, v, v], dim=1).repeat(3, 1) for k, v in inputs.items()}
    actual = onnx_logits(path, {k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_allclose(actual, logits(model, inputs).numpy(), atol=1e-4)


def test_int8_export_is_smaller_and_close(tmp_path):
    from transformers import BertConfig

    # Wide enough for the matrices to outweigh the (unquantised) embeddings.
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=64)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    apply_plan(model, Plan(2, heads={0: (0, 2)}, neurons={1: tuple(range(200))}))
    save_pretrained(model, tmp_path / "model")
    fp32 = export_onnx(tmp_path / "model", tmp_path / "fp32.onnx")
    int8 = export_onnx(tmp_path / "model", tmp_path / "int8.onnx", int8=True)
    inputs = {k: v.numpy() for k, v in batch().items()}
    assert int8.stat().st_size < fp32.stat().st_size
    np.testing.assert_allclose(onnx_logits(int8, inputs), onnx_logits(fp32, inputs), atol=0.05)


def test_a_layers_only_plan_reloads_with_plain_transformers(tmp_path):
    model = apply_plan(tiny_model("bert"), Plan.layers(4, (0, 3)))
    save_pretrained(model, tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(logits(plain.eval()), logits(model))


def test_a_width_plan_refuses_weights_of_another_plan(tmp_path):
    model = apply_plan(tiny_model("bert"), width_plan(tiny_model("bert")))
    save_pretrained(model, tmp_path)
    other = Plan(4, removed=(2,), heads={0: (0, 1)})
    (tmp_path / PLAN_FILE).write_text(other.to_json())
    with pytest.raises(GlpError, match="do not match its plan"):
        load_pretrained(tmp_path)


def test_plan_json_round_trip_and_stable_hash():
    plan = Plan(6, removed=(5, 1), heads={2: (3, 0)}, neurons={0: (9, 1, 4)},
                blocks={"0.query": BlockMask.from_kept(2, 2, 3, [1, 0, 1, 1, 0, 0])})
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.key == plan.key
    assert plan.removed == (1, 5) and plan.heads[2] == (0, 3)  # canonical order
    assert json.loads(plan.to_json())["format"] == 1
    assert Plan(6, heads={2: (0, 3)}).key != Plan(6, heads={2: (0, 4)}).key
    assert plan.blocks["0.query"].kept() == [True, False, True, True, False, False]
    assert plan.kind == "layers+heads+neurons+blocks"


@pytest.mark.parametrize("text, message", [
    ("[1]", "expected a JSON object"), ('{"format": "x", "num_layers": 4}', "not a number"),
    ('{"format": 9, "num_layers": 4}', "newer than this glp"), ("{", "must be JSON"),
    ('{"num_layers": 4, "heads": {"0": "x"}}', "not a glp plan"),
])
def test_bad_plan_files_are_one_clear_error(text, message):
    with pytest.raises(GlpError, match=message):
        Plan.from_json(text)


def test_a_block_mask_checks_its_bits():
    with pytest.raises(GlpError, match="needs 2 lower-case hex digits"):
        BlockMask(16, 2, 3, "f")


def test_composing_refuses_what_cannot_be():
    with pytest.raises(GlpError, match="disjoint"):
        Plan(4, heads={0: (0,)}).compose(Plan(4, heads={0: (1,)}))
    blocks = Plan(4, blocks={"0.query": BlockMask(16, 2, 2, "f")})
    with pytest.raises(GlpError, match="prune blocks last"):
        blocks.compose(Plan(4, heads={0: (0,)}))
    assert blocks.compose(Plan.layers(4, (0,))).blocks == {}  # removed with its layer


def test_plans_compose_in_base_indices():
    layers = Plan.layers(4, (1,))
    width = Plan(4, heads={0: (0, 1), 1: (0,)}, neurons={2: (3, 4)})
    both = layers.compose(width)
    assert both.removed == (1,) and both.heads == {0: (0, 1)} and both.neurons == {2: (3, 4)}
    assert both.compose(Plan(4, heads={0: (1, 2)})).heads == {0: (1,)}


@pytest.mark.parametrize("bad, message", [
    (dict(num_layers=4, removed=(0, 1, 2, 3)), "at least one"),
    (dict(num_layers=4, removed=(4,)), "names layer 4"),
    (dict(num_layers=4, heads={1: ()}), "keeps no heads"),
    (dict(num_layers=4, blocks={"0.fc": BlockMask(2, 1, 1, "1")}), "role"),
    (dict(num_layers=4, blocks={"9.query": BlockMask(2, 1, 1, "1")}), "does not keep"),
    (dict(num_layers=4, removed=(1,), blocks={"1.key": BlockMask(2, 1, 1, "1")}),
     "does not keep"),
])
def test_bad_plans_are_refused(bad, message):
    with pytest.raises(GlpError, match=message):
        Plan(**bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_match_the_sliced_model(family):
    model = tiny_model(family)
    plan = width_plan(model)
    counts = plan.parameter_counts(model.config)
    assert model.config.num_hidden_layers == 4  # counting does not touch the config
    base = sum(p.numel() for p in encoder_layers(model).parameters())
    apply_plan(model, plan)
    assert counts["parameters"] == n_params(model)
    assert counts["encoder"] == sum(p.numel() for p in encoder_layers(model).parameters())
    assert counts["encoder_base"] == base
    base_config = tiny_model(family).config
    assert 0 < plan.encoder_density(base_config) < 0.75
    assert Plan.layers(4).encoder_density(base_config) == 1.0
    assert Plan.layers(4, (0, 1)).encoder_density(base_config) == pytest.approx(0.5)


def test_block_masks_zero_their_blocks_and_count_as_zeroed():
    model = tiny_model("bert")
    query = role_module(model, encoder_layers(model)[1], "query")  # 32 x 32
    mask = BlockMask.from_kept(16, 2, 2, [True, False, False, True])
    plan = Plan(4, blocks={"1.query": mask})
    apply_plan(model, plan)
    assert torch.count_nonzero(query.weight[:16, 16:]) == 0
    assert torch.count_nonzero(query.weight[16:, :16]) == 0
    assert torch.count_nonzero(query.weight[:16, :16]) == 256
    assert plan.parameter_counts(model.config)["zeroed"] == 512


def test_apply_plan_refuses_a_plan_for_another_depth_and_a_second_width_cut():
    with pytest.raises(GlpError, match="4-layer"):
        apply_plan(tiny_model("bert", layers=3), Plan(4, heads={0: (0,)}))
    model = apply_plan(tiny_model("bert"), Plan(4, heads={0: (0,)}))
    with pytest.raises(GlpError, match="already cut in width"):
        apply_plan(model, Plan(4, heads={1: (0,)}))


@pytest.mark.parametrize(("data", "expected"), [
    ({"num_layers": 6, "heads": {"0": 5}}, "heads of layer 0 must be a list of head indices"),
    ({"num_layers": 6, "qk": {"0": ["a"]}}, "each of qk of layer 0 must be a whole number"),
    ({"num_layers": 6, "ranks": {"0.query": "abc"}}, "ranks '0.query' must be a whole number"),
    ({"num_layers": 6, "removed": [[1]]}, "each of removed must be a whole number, got [1]"),
    ({"num_layers": [6]}, "num_layers must be a whole number, got [6]"),
    ({"num_layers": 6, "heads": [1, 2]}, "heads must be an object of layer numbers"),
    ({"num_layers": 6, "blocks": {"0.query": 3}}, "blocks '0.query' must be an object"),
    ({"removed": [1]}, "it has no num_layers"),
])
def test_a_hand_edited_plan_of_the_wrong_shape_is_named_not_a_python_error(data, expected,
                                                                           tmp_path):
    (tmp_path / "glp_plan.json").write_text(json.dumps(data))
    with pytest.raises(GlpError) as error:
        read_plan(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'glp_plan.json'}: not a glp plan: ")
    assert expected in message
    assert "TypeError" not in message and "ValueError" not in message
