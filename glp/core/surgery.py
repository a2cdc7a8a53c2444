"""Physically removing encoder layers from a transformers model, in place.

Removing a layer means building a shorter ``nn.ModuleList`` of the remaining layer modules
(the same objects, weights untouched) and making the config agree with it, so that
``save_pretrained`` followed by a plain ``from_pretrained`` (no glp involved) rebuilds the
pruned architecture. The config also records which original layers remain
(``glp_kept_layers``) and which were removed (``glp_removed_layers``); transformers keeps
unknown config keys through save and load, so the record travels with the checkpoint.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from glp.core.anatomy import (
    KEPT_KEY,
    PLAN_ATTR,
    REMOVED_KEY,
    encoder_layers,
    family_of,
    get_module,
    kept_layers,
    layer_configs,
    layer_container,
    num_heads,
    removed_layers,
    role_module,
    set_module,
)
from glp.core.errors import GlpError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel



# Config lists with one entry per layer (none of the supported families has one today, but
# transformers 5 adds ``layer_types`` to more and more configs); they are pruned alongside.
PER_LAYER_CONFIG_KEYS = (
    "layer_types",
    "mlp_layer_types",
    "layers_block_type",
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
)

# Per-module layer numbers (transformers 5 BERT/RoBERTa/XLM-R/ELECTRA attention modules
# carry ``layer_idx``, used to index KV caches); renumbered so that they match positions.
_LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")

# Layer counts cached on the container module (DistilBERT's Transformer has ``n_layers``).
_CONTAINER_COUNT_ATTRS = ("n_layers", "num_layers", "num_hidden_layers")












def _validate(layers: Iterable[int], n: int) -> list[int]:
    if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
        raise GlpError(
            f"layers to remove must be a collection of layer indices, got {layers!r}; "
            f"choose indices in 0..{n - 1}"
        )
    indices = []
    for item in layers:
        try:
            if isinstance(item, bool):
                raise TypeError
            indices.append(operator.index(item))
        except TypeError:
            raise GlpError(
                f"layer index {item!r} is not an integer; choose indices in 0..{n - 1}"
            ) from None
    for i in indices:
        if not 0 <= i < n:
            raise GlpError(
                f"cannot remove layer {i}: the model has {n} encoder layers; "
                f"choose indices in 0..{n - 1}"
            )
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise GlpError(
            f"layer {duplicates[0]} is listed more than once in {indices}; "
            "give each layer to remove once"
        )
    if len(indices) >= n:
        raise GlpError(
            f"cannot remove {len(indices)} layers: the model has {n} encoder layers; "
            f"at least one layer must remain: choose at most {n - 1} layers"
        )
    return sorted(indices)


def remove_layers(model: PreTrainedModel, layers: Iterable[int]) -> PreTrainedModel:
    """Remove encoder layers physically, in place, and record which ones in the config.

    The remaining layer modules are kept as they are (same objects, same weights), in
    order. The config's layer count and any per-layer config lists shrink to match; layer
    numbers stored on modules (``layer_idx``) are renumbered. ``config.glp_kept_layers``
    and ``config.glp_removed_layers`` hold original indices, so pruning a pruned model
    composes. An empty ``layers`` is allowed and only writes the record.

    Args:
        model: a supported transformers model.
        layers: indices into the model's current layer list.

    Returns:
        The same model object.

    Raises:
        GlpError: unsupported model, an index out of range or not an integer, a duplicate
            index, or removing every layer.
    """
    from torch import nn

    container = layer_container(model)
    current = container.layer
    n = len(current)
    to_remove = _validate(layers, n)

    config = model.config
    original = kept_layers(config)
    if len(original) != n:
        raise GlpError(
            f"the config records {len(original)} kept layers ({KEPT_KEY}={original}) but the "
            f"model has {n}; the record is stale, so the original indices are unknown"
        )
    keep_positions = [i for i in range(n) if i not in set(to_remove)]
    new_kept = [original[i] for i in keep_positions]
    new_removed = sorted(set(removed_layers(config)) | {original[i] for i in to_remove})

    container.layer = nn.ModuleList([current[i] for i in keep_positions])
    for position, layer in enumerate(container.layer):
        for module in layer.modules():
            for attr in _LAYER_INDEX_ATTRS:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(module, attr, position)
    for attr in _CONTAINER_COUNT_ATTRS:
        if getattr(container, attr, None) == n:
            setattr(container, attr, len(keep_positions))

    for cfg in layer_configs(model):
        _update_config(cfg, n, keep_positions, new_kept, new_removed)
    return model


def _update_config(
    config: PretrainedConfig,
    n: int,
    keep_positions: list[int],
    new_kept: list[int],
    new_removed: list[int],
) -> None:
    for key in PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list | tuple) and len(value) == n:
            setattr(config, key, type(value)(value[i] for i in keep_positions))
    # DistilBERT's native key is n_layers (num_hidden_layers is only an attribute_map alias,
    # and only native keys are written to config.json).
    distilbert = getattr(config, "model_type", None) == "distilbert"
    setattr(config, "n_layers" if distilbert else "num_hidden_layers", len(keep_positions))
    setattr(config, KEPT_KEY, list(new_kept))
    setattr(config, REMOVED_KEY, list(new_removed))


# --- width: heads, FFN neurons and weight blocks ---------------------------------------------









def prune_linear(linear: nn.Linear, index: Sequence[int], dim: int = 0) -> nn.Linear:
    """A new ``nn.Linear`` keeping only ``index`` along ``dim`` (0: outputs, 1: inputs).

    The one slicing primitive every width method rests on: weights are copied (and keep
    their ``requires_grad``), the bias follows the outputs, the device and dtype stay.
    """
    import warnings

    import torch
    from torch import nn

    keep = torch.as_tensor(list(index), dtype=torch.long, device=linear.weight.device)
    weight = linear.weight.index_select(dim, keep).detach().clone()
    bias = linear.bias
    if bias is not None:
        bias = (bias.index_select(0, keep) if dim == 0 else bias).detach().clone()
    out_features, in_features = weight.shape
    with warnings.catch_warnings():  # a slice may be empty (a layer with no query/key dim)
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        new = nn.Linear(in_features, out_features, bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new














def _slice_heads(model: nn.Module, layer: nn.Module, heads: Sequence[int]) -> None:
    import torch

    family = family_of(model)
    attention = get_module(layer, family.attention)
    size = int(attention.attention_head_size)
    rows = [h * size + i for h in heads for i in range(size)]
    for name in family.projections:
        if isinstance(getattr(attention, name, None), torch.nn.Linear):
            setattr(attention, name, prune_linear(getattr(attention, name), rows, dim=0))
    set_module(layer, family.output, prune_linear(get_module(layer, family.output), rows, dim=1))
    setattr(attention, family.head_count, len(heads))
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = len(heads) * size
    _take_position_bias(model, attention, heads)


def _slice_dims(model: nn.Module, layer: nn.Module, qk: Sequence[int] | None,
                vo: Sequence[int] | None) -> None:
    """Keep per head its own query/key and value/output dimensions (see glp.core.attention)."""
    import math

    import torch

    from glp.core.attention import GatherLinear, ScatterLinear, grouped_layout, layout

    family = family_of(model)
    attention = get_module(layer, family.attention)
    size, heads = int(attention.attention_head_size), num_heads(model)
    every = range(heads * size)
    qk = list(every) if qk is None else list(qk)
    vo = list(every) if vo is None else list(vo)
    for what, dims in (("query/key", qk), ("value/output", vo)):
        if dims and max(dims) >= heads * size:
            raise GlpError(f"{what} dimension {max(dims)} does not exist ({heads} heads of "
                           f"{size})")
    if family.grouped:
        _group_dims(layer, family, grouped_layout(qk, vo, heads, size), size)
        return
    plan = layout(qk, vo, heads, size)
    width, kept = plan["width"], plan["heads"]
    # Families that scale by the padded size at run time get the base scale back here.
    scale = 1.0 if hasattr(attention, "scaling") else math.sqrt(width / size)
    value_name = family.projections[2]
    for name in family.projections:
        linear = getattr(attention, name, None)
        if not isinstance(linear, torch.nn.Linear):
            continue
        rows, slots = plan["vo" if name == value_name else "qk"]
        scaled = name in (family.projections[0], "pos_query_proj")
        setattr(attention, name, ScatterLinear(prune_linear(linear, rows, dim=0), slots,
                                               len(kept) * width, scale if scaled else 1.0))
    rows, slots = plan["vo"]
    output = get_module(layer, family.output)
    set_module(layer, family.output, GatherLinear(prune_linear(output, rows,
                                                         dim=1), slots))
    setattr(attention, family.head_count, len(kept))
    attention.attention_head_size = width
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = len(kept) * width
    if len(kept) < heads:
        _take_position_bias(model, attention, kept)


def _group_dims(layer: nn.Module, family, plan: dict, size: int) -> None:
    """A BERT-like layer's uneven heads as :class:`glp.core.attention.GroupedSelfAttention`."""
    from glp.core.attention import GroupedLinear, GroupedOutput, GroupedSelfAttention

    attention = get_module(layer, family.attention)
    linears = []
    for name in family.projections:
        rows, index = plan["vo" if name == family.projections[2] else "qk"]
        linears.append(GroupedLinear(prune_linear(getattr(attention, name), rows, dim=0),
                                     index))
    rows, index = plan["vo"]
    set_module(layer, family.output, GroupedOutput(
        prune_linear(get_module(layer, family.output), rows, dim=1), index))
    set_module(layer, family.attention,
               GroupedSelfAttention(attention, *linears, plan["groups"], size))


def _take_position_bias(model: nn.Module, attention: nn.Module, heads: Sequence[int]) -> None:
    """MPNet adds one relative position bias, computed for every head by the encoder, to
    each layer's scores: a layer that lost heads takes the rows of those it kept."""
    import torch

    if getattr(model.config, "model_type", None) != "mpnet":
        return
    kept = torch.tensor(list(heads), dtype=torch.long)

    def take_kept_heads(module, args, kwargs):
        if len(args) > 2 and args[2] is not None:
            args = (*args[:2], args[2].index_select(1, kept.to(args[2].device)), *args[3:])
        elif kwargs.get("position_bias") is not None:
            bias = kwargs["position_bias"]
            kwargs = {**kwargs, "position_bias": bias.index_select(1, kept.to(bias.device))}
        return args, kwargs

    attention.register_forward_pre_hook(take_kept_heads, with_kwargs=True)


def _slice_neurons(model: nn.Module, layer: nn.Module, neurons: Sequence[int]) -> None:
    family = family_of(model)
    set_module(layer, family.ffn_in, prune_linear(get_module(layer, family.ffn_in), neurons, dim=0))
    ffn_out = get_module(layer, family.ffn_out)
    set_module(layer, family.ffn_out, prune_linear(ffn_out, neurons, dim=1))


def block_grid(shape: Sequence[int], size: int) -> tuple[int, int]:
    """Blocks per column and per row of a matrix (edge blocks may be partial)."""
    return -(-int(shape[0]) // size), -(-int(shape[1]) // size)


def block_element_mask(mask, shape: Sequence[int]):
    """A 0/1 float tensor of ``shape`` from a :class:`glp.core.plan.BlockMask`."""
    import torch

    rows, cols = block_grid(shape, mask.size)
    if (rows, cols) != (mask.rows, mask.cols):
        raise GlpError(f"a block mask of {mask.rows}x{mask.cols} blocks of {mask.size} does "
                       f"not fit a {shape[0]}x{shape[1]} matrix ({rows}x{cols} blocks)")
    grid = torch.tensor(mask.kept(), dtype=torch.float32).view(rows, cols)
    full = grid.repeat_interleave(mask.size, 0).repeat_interleave(mask.size, 1)
    return full[: shape[0], : shape[1]]


def zeroed_weights(mask, shape: Sequence[int]) -> int:
    """How many weights of a ``shape`` matrix a block mask zeroes."""
    return int(shape[0]) * int(shape[1]) - int(block_element_mask(mask, shape).sum())


def apply_plan(model: PreTrainedModel, plan, factor="svd") -> PreTrainedModel:
    """Cut a model to a :class:`glp.core.plan.Plan`, in place: slice heads and FFN neurons,
    zero pruned weight blocks, remove layers (physically, see :func:`remove_layers`), then
    factorise the matrices the plan gives a rank.

    ``factor`` chooses the factors' values: ``"svd"`` (truncated SVD of the weights), a
    :data:`glp.methods.lowrank.FactorFn`, or None (structure only: the weights are loaded next).
    A model already cut to the plan's width (a width-pruned model) only gets the ranks.

    The model must be the plan's base architecture (it may already miss some of the
    plan's removed layers, not others). The plan is remembered on the model
    (``model.glp_plan``) so that saving writes it.

    Raises:
        GlpError: unsupported family, a plan for another depth, indices out of range, or
            a model that was already cut in width.
    """
    import torch

    current = getattr(model, PLAN_ATTR, None)
    if current is not None and not current.is_layers_only:
        if current.ranks or current.coded or current != plan.width_part():
            raise GlpError("this model was already cut in width; apply plans to the base "
                           "model (compose plans with Plan.compose)")
        _apply_offline(model, plan, factor)  # its width cut is the plan's: add the ranks
        setattr(model, PLAN_ATTR, plan)
        return model
    base_layers = len(kept_layers(model)) + len(removed_layers(model))
    if base_layers != plan.num_layers:
        raise GlpError(f"the plan is for a {plan.num_layers}-layer model; this one has "
                       f"{base_layers} encoder layers")
    missing = set(removed_layers(model)) - set(plan.removed)
    if missing:
        raise GlpError(f"the model already lacks layers {sorted(missing)}, which the plan keeps")
    if plan.heads or plan.neurons or plan.blocks or plan.qk or plan.vo:
        layers = encoder_layers(model)
        heads = num_heads(model)
        position = {original: p for p, original in enumerate(kept_layers(model))}
        for original, kept in plan.heads.items():
            if original in position:
                if max(kept) >= heads:
                    raise GlpError(f"layer {original}: head {max(kept)} does not exist "
                                   f"({heads} heads)")
                _slice_heads(model, layers[position[original]], kept)
        for original in sorted(set(plan.qk) | set(plan.vo)):
            if original in position:
                _slice_dims(model, layers[position[original]], plan.qk.get(original),
                            plan.vo.get(original))
        for original, kept in plan.neurons.items():
            if original in position:
                width = role_module(model, layers[position[original]], "ffn_in").out_features
                if max(kept) >= width:
                    raise GlpError(f"layer {original}: FFN neuron {max(kept)} does not "
                                   f"exist ({width} neurons)")
                _slice_neurons(model, layers[position[original]], kept)
        for key, mask in plan.blocks.items():
            layer, _, role = key.partition(".")
            if int(layer) in position:
                linear = role_module(model, layers[position[int(layer)]], role)
                if linear.weight.device.type != "meta":
                    with torch.no_grad():
                        element = block_element_mask(mask, linear.weight.shape)
                        linear.weight.mul_(element.to(linear.weight))
    remove_layers(model, [p for p, original in enumerate(kept_layers(model))
                          if original in set(plan.removed)])
    _apply_offline(model, plan, factor)
    setattr(model, PLAN_ATTR, plan)
    return model


def _apply_offline(model: PreTrainedModel, plan, factor) -> None:
    if not plan.ranks:
        return
    from glp.core.factors import apply_ranks, plain_factors

    apply_ranks(model, plan.ranks, plan.shared, plain_factors if factor == "svd" else factor)


