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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glp import GlpError
from glp.models import num_encoder_layers, unsupported_reason

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

KEPT_KEY = "glp_kept_layers"
REMOVED_KEY = "glp_removed_layers"

# Attributes under which a layer container holds the layer list, by family: BERT, RoBERTa,
# XLM-R, ELECTRA, MPNet and DeBERTa-v2 use ``encoder.layer``; DistilBERT ``transformer.layer``.
_CONTAINERS = ("encoder", "transformer")

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


def _container(model: nn.Module) -> nn.Module:
    from torch import nn

    config = getattr(model, "config", None)
    if config is not None:
        reason = unsupported_reason(config)
        if reason is not None:
            raise GlpError(reason)
    base = getattr(model, "base_model", model)
    for name in _CONTAINERS:
        container = getattr(base, name, None)
        if isinstance(getattr(container, "layer", None), nn.ModuleList):
            return container
    model_type = getattr(config, "model_type", type(model).__name__)
    raise GlpError(
        f"model type '{model_type}' has no encoder layer list (looked for "
        f"{' / '.join(n + '.layer' for n in _CONTAINERS)} on {type(base).__name__}); "
        "glp prunes encoders such as bert, roberta, distilbert"
    )


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's list of layer modules, for any supported family.

    Args:
        model: a transformers model (a base model or one with a task head).

    Returns:
        The live ``nn.ModuleList`` (not a copy).

    Raises:
        GlpError: the model type is not supported or has no encoder layer list.
    """
    return _container(model).layer


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    # The head model and its base model share one config object in every supported family;
    # should they ever differ, both must describe the pruned shape.
    configs = {}
    for owner in (model, getattr(model, "base_model", model)):
        config = getattr(owner, "config", None)
        if config is not None:
            configs[id(config)] = config
    return list(configs.values())


def kept_layers(model_or_config: nn.Module | PretrainedConfig) -> list[int]:
    """Original indices of the layers a model still has (all of them if never pruned).

    Args:
        model_or_config: a model or its config.

    Returns:
        Sorted original layer indices, one per current layer.
    """
    config = getattr(model_or_config, "config", model_or_config)
    record = getattr(config, KEPT_KEY, None)
    if record is None:
        return list(range(num_encoder_layers(config)))
    return [int(i) for i in record]


def removed_layers(model_or_config: nn.Module | PretrainedConfig) -> list[int]:
    """Original indices of the layers removed so far (empty if never pruned).

    Args:
        model_or_config: a model or its config.

    Returns:
        Sorted original layer indices.
    """
    config = getattr(model_or_config, "config", model_or_config)
    return sorted(int(i) for i in (getattr(config, REMOVED_KEY, None) or []))


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

    container = _container(model)
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

    for cfg in _configs(model):
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


@dataclass(frozen=True)
class _Family:
    """Where a family keeps a layer's attention and FFN matrices (paths from the layer)."""

    attention: str  # the module holding the head count and the projections
    projections: tuple[str, ...]  # on ``attention``: sliced by rows, per head
    output: str  # the attention output matrix: sliced by columns
    ffn_in: str  # rows = FFN neurons
    ffn_out: str  # columns = FFN neurons
    head_count: str = "num_attention_heads"


_BERT_LIKE = _Family("attention.self", ("query", "key", "value"), "attention.output.dense",
                     "intermediate.dense", "output.dense")
FAMILIES: dict[str, _Family] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": _Family("attention", ("q_lin", "k_lin", "v_lin"), "attention.out_lin",
                          "ffn.lin1", "ffn.lin2", head_count="n_heads"),
    "mpnet": _Family("attention.attn", ("q", "k", "v"), "attention.attn.o",
                     "intermediate.dense", "output.dense"),
    # pos_key_proj / pos_query_proj project the shared relative embeddings per head.
    "deberta-v2": _Family("attention.self",
                          ("query_proj", "key_proj", "value_proj", "pos_key_proj",
                           "pos_query_proj"),
                          "attention.output.dense", "intermediate.dense", "output.dense"),
}

PLAN_ATTR = "glp_plan"
"""The attribute under which a model remembers the plan applied to it."""


def _family(model: nn.Module) -> _Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise GlpError(f"model type '{model_type}' has no width surgery; supported: "
                       f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


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


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def role_module(model: nn.Module, layer: nn.Module, role: str) -> nn.Linear:
    """The ``nn.Linear`` of a layer for a role (query, key, value, output, ffn_in, ffn_out)."""
    family = _family(model)
    if role in ("query", "key", "value"):
        name = family.projections[("query", "key", "value").index(role)]
        return getattr(_get(layer, family.attention), name)
    return _get(layer, {"output": family.output, "ffn_in": family.ffn_in,
                        "ffn_out": family.ffn_out}[role])


def head_projections(model: nn.Module, layer: nn.Module) -> list[nn.Linear]:
    """Every per-head projection of a layer's attention (query, key, value, and DeBERTa's
    relative-position projections where the layer has them): their rows go with a head."""
    import torch

    attention = _get(layer, _family(model).attention)
    return [getattr(attention, name) for name in _family(model).projections
            if isinstance(getattr(attention, name, None), torch.nn.Linear)]


def head_size(model: nn.Module) -> int:
    """The per-head width of a model's attention (the same in every layer)."""
    layer = encoder_layers(model)[0]
    return int(_get(layer, _family(model).attention).attention_head_size)


def num_heads(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "n_heads", None) or config.num_attention_heads)


def _slice_heads(model: nn.Module, layer: nn.Module, heads: Sequence[int]) -> None:
    import torch

    family = _family(model)
    attention = _get(layer, family.attention)
    size = int(attention.attention_head_size)
    rows = [h * size + i for h in heads for i in range(size)]
    for name in family.projections:
        if isinstance(getattr(attention, name, None), torch.nn.Linear):
            setattr(attention, name, prune_linear(getattr(attention, name), rows, dim=0))
    _set(layer, family.output, prune_linear(_get(layer, family.output), rows, dim=1))
    setattr(attention, family.head_count, len(heads))
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = len(heads) * size
    _take_position_bias(model, attention, heads)


def _slice_dims(model: nn.Module, layer: nn.Module, qk: Sequence[int] | None,
                vo: Sequence[int] | None) -> None:
    """Keep per head its own query/key and value/output dimensions (see glp.attention)."""
    import math

    import torch

    from glp.attention import GatherLinear, ScatterLinear, layout

    family = _family(model)
    attention = _get(layer, family.attention)
    size, heads = int(attention.attention_head_size), num_heads(model)
    every = range(heads * size)
    qk = list(every) if qk is None else list(qk)
    vo = list(every) if vo is None else list(vo)
    for what, dims in (("query/key", qk), ("value/output", vo)):
        if dims and max(dims) >= heads * size:
            raise GlpError(f"{what} dimension {max(dims)} does not exist ({heads} heads of "
                           f"{size})")
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
    _set(layer, family.output, GatherLinear(prune_linear(_get(layer, family.output), rows,
                                                         dim=1), slots))
    setattr(attention, family.head_count, len(kept))
    attention.attention_head_size = width
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = len(kept) * width
    if len(kept) < heads:
        _take_position_bias(model, attention, kept)


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
    family = _family(model)
    _set(layer, family.ffn_in, prune_linear(_get(layer, family.ffn_in), neurons, dim=0))
    _set(layer, family.ffn_out, prune_linear(_get(layer, family.ffn_out), neurons, dim=1))


def block_grid(shape: Sequence[int], size: int) -> tuple[int, int]:
    """Blocks per column and per row of a matrix (edge blocks may be partial)."""
    return -(-int(shape[0]) // size), -(-int(shape[1]) // size)


def block_element_mask(mask, shape: Sequence[int]):
    """A 0/1 float tensor of ``shape`` from a :class:`glp.plan.BlockMask`."""
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
    """Cut a model to a :class:`glp.plan.Plan`, in place: slice heads and FFN neurons,
    zero pruned weight blocks, remove layers (physically, see :func:`remove_layers`), then
    factorise the matrices the plan gives a rank.

    ``factor`` chooses the factors' values: ``"svd"`` (truncated SVD of the weights), a
    :data:`glp.lowrank.FactorFn`, or None (structure only: the weights are loaded next).
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
    from glp.lowrank import apply_ranks, plain_factors

    apply_ranks(model, plan.ranks, plan.shared, plain_factors if factor == "svd" else factor)


def plan_of_model(model: nn.Module):
    """The plan a model was cut to (a layers-only plan from its config record if none)."""
    from glp.plan import Plan

    plan = getattr(model, PLAN_ATTR, None)
    if plan is not None:
        return plan
    return Plan.layers(len(kept_layers(model)) + len(removed_layers(model)),
                       removed_layers(model))
