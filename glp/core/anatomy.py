"""Where an encoder keeps its layers and matrices, per model family (no weights change here)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glp.core.errors import GlpError, ParamError
from glp.core.models import num_encoder_layers, unsupported_reason

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig


ROLES = ("query", "key", "value", "output", "ffn_in", "ffn_out")
"""The matrices of a layer that block masks can name."""

EMBEDDINGS = "embeddings"
"""The word-embedding matrix, as offline compression names it (next to :data:`ROLES`)."""

OFFLINE_ROLES = (*ROLES, EMBEDDINGS)
"""Every module type offline compression can compress."""

KEPT_KEY = "glp_kept_layers"


REMOVED_KEY = "glp_removed_layers"


# Attributes under which a layer container holds the layer list, by family: BERT, RoBERTa,
# XLM-R, ELECTRA, MPNet and DeBERTa-v2 use ``encoder.layer``; DistilBERT ``transformer.layer``.
_CONTAINERS = ("encoder", "transformer")


def layer_container(model: nn.Module) -> nn.Module:
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
    return layer_container(model).layer


def layer_configs(model: nn.Module) -> list[PretrainedConfig]:
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


@dataclass(frozen=True)
class _Family:
    """Where a family keeps a layer's attention and FFN matrices (paths from the layer)."""

    attention: str  # the module holding the head count and the projections
    projections: tuple[str, ...]  # on ``attention``: sliced by rows, per head
    output: str  # the attention output matrix: sliced by columns
    ffn_in: str  # rows = FFN neurons
    ffn_out: str  # columns = FFN neurons
    head_count: str = "num_attention_heads"
    # ``attention`` is a BERT-style self-attention module (called with the hidden states and
    # the prepared mask, returning the context and the weights): uneven heads run in groups
    # (glp.core.attention.GroupedSelfAttention) instead of the padded layout.
    grouped: bool = False


_BERT_LIKE = _Family("attention.self", ("query", "key", "value"), "attention.output.dense",
                     "intermediate.dense", "output.dense", grouped=True)


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


def family_of(model: nn.Module) -> _Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise GlpError(f"model type '{model_type}' has no width surgery; supported: "
                       f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def get_module(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_module(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(module, parent) if parent else module, name, value)


def role_module(model: nn.Module, layer: nn.Module, role: str) -> nn.Linear:
    """The ``nn.Linear`` of a layer for a role (query, key, value, output, ffn_in, ffn_out)."""
    family = family_of(model)
    if role in ("query", "key", "value"):
        name = family.projections[("query", "key", "value").index(role)]
        return getattr(get_module(layer, family.attention), name)
    return get_module(layer, {"output": family.output, "ffn_in": family.ffn_in,
                        "ffn_out": family.ffn_out}[role])


def head_projections(model: nn.Module, layer: nn.Module) -> list[nn.Linear]:
    """Every per-head projection of a layer's attention (query, key, value, and DeBERTa's
    relative-position projections where the layer has them): their rows go with a head."""
    import torch

    attention = get_module(layer, family_of(model).attention)
    return [getattr(attention, name) for name in family_of(model).projections
            if isinstance(getattr(attention, name, None), torch.nn.Linear)]


def head_size(model: nn.Module) -> int:
    """The per-head width of a model's attention (the same in every layer)."""
    layer = encoder_layers(model)[0]
    return int(get_module(layer, family_of(model).attention).attention_head_size)


def num_heads(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "n_heads", None) or config.num_attention_heads)




def parse_roles(values: Iterable[str] | str) -> tuple[str, ...]:
    """Module types as given (names, comma lists, ``all``), checked, in the plan's order."""
    names: list[str] = []
    for value in [values] if isinstance(values, str) else values:
        names += [v.strip() for v in str(value).split(",") if v.strip()]
    if "all" in names:
        return OFFLINE_ROLES
    bad = [n for n in names if n not in OFFLINE_ROLES]
    if bad or not names:
        raise ParamError("modules", ",".join(bad or names) or repr(""),
                         f"from {', '.join(OFFLINE_ROLES)} or all (comma-separated)")
    return tuple(r for r in OFFLINE_ROLES if r in names)
