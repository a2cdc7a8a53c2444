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
from collections.abc import Iterable
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
