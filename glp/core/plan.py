"""Compression plans: one small, JSON-serialisable description of a compressed encoder.

A plan says what remains of a base architecture: the encoder layers removed, and per
remaining layer the attention heads and FFN neurons kept, and the zeroed weight blocks
of its matrices (block-sparse pruning). Every index is an index of the *base* model
(original layer numbers, original head and neuron numbers), so a plan means the same
thing wherever it is stored, and plans compose: removing layers, then width, is the
union of the two plans. Layer removal is the plan with only ``removed`` set.

``glp.core.surgery.apply_plan`` slices a model to a plan; ``glp.core.checkpoint`` saves a model with
its plan and rebuilds it from config + plan; this module only describes and counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from glp.core.anatomy import (
    EMBEDDINGS,
    OFFLINE_ROLES,
    PLAN_ATTR,
    ROLES,
    kept_layers,
    removed_layers,
)
from glp.core.errors import GlpError, ParamError
from glp.core.hashing import stable_hash

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PLAN_FILE = "glp_plan.json"
"""The file beside ``config.json`` that holds a saved model's plan."""

FORMAT = 1

"""The module types offline compression (low rank, autoencoder) can compress."""


def _rank_key(key: str, num_layers: int, removed: tuple[int, ...], what: str) -> None:
    if key == EMBEDDINGS:
        return
    layer, _, role = key.partition(".")
    if not layer.isdigit() or role not in ROLES:
        raise GlpError(f"{what} '{key}': name it '{EMBEDDINGS}' or '<layer>.<role>' with a "
                       f"role in {', '.join(ROLES)}")
    if int(layer) >= num_layers or int(layer) in removed:
        kept = [i for i in range(num_layers) if i not in removed]
        raise GlpError(f"{what} '{key}' names layer {layer}, which the plan does not keep "
                       f"(it keeps {kept})")


def _indices(values: Iterable[int], what: str) -> tuple[int, ...]:
    out = tuple(sorted({int(v) for v in values}))
    if any(v < 0 for v in out):
        raise GlpError(f"{what}: indices must be >= 0, got {list(out)}")
    return out


@dataclass(frozen=True)
class BlockMask:
    """The kept blocks of one weight matrix: ``size``x``size`` blocks, row-major bits.

    ``bits`` is a hex string of ``rows * cols`` bits (1 = block kept), where ``rows`` and
    ``cols`` count blocks. The matrix shape is the one after heads and neurons are sliced.
    """

    size: int
    rows: int
    cols: int
    bits: str

    def kept(self) -> list[bool]:
        value = int(self.bits, 16) if self.bits else 0
        n = self.rows * self.cols
        return [bool(value >> (n - 1 - i) & 1) for i in range(n)]

    @classmethod
    def from_kept(cls, size: int, rows: int, cols: int, kept: Iterable[bool]) -> BlockMask:
        flags = list(kept)
        if len(flags) != rows * cols:
            raise GlpError(f"a block mask of {rows}x{cols} blocks needs {rows * cols} flags, "
                           f"got {len(flags)}")
        value = 0
        for flag in flags:
            value = value << 1 | int(bool(flag))
        width = (rows * cols + 3) // 4
        return cls(size, rows, cols, format(value, f"0{width}x") if width else "")

    def __post_init__(self):
        if self.size < 1 or self.rows < 1 or self.cols < 1:
            raise GlpError(f"a block mask needs a positive block size and grid, got size "
                           f"{self.size}, {self.rows}x{self.cols} blocks")
        width = (self.rows * self.cols + 3) // 4
        if len(self.bits) != width or any(c not in "0123456789abcdef" for c in self.bits):
            raise GlpError(f"a block mask of {self.rows}x{self.cols} blocks needs {width} "
                           f"lower-case hex digits, got {self.bits!r}")

    @property
    def density(self) -> float:
        flags = self.kept()
        return sum(flags) / len(flags) if flags else 1.0


@dataclass(frozen=True)
class Plan:
    """What remains of a base encoder (see the module docstring).

    Attributes:
        num_layers: encoder layers of the base model.
        removed: original indices of the removed layers.
        heads: per original layer index, the attention heads kept (absent: all).
        neurons: per original layer index, the FFN intermediate neurons kept (absent: all).
        blocks: per ``"<layer>.<role>"`` (role in :data:`ROLES`), the kept weight blocks.
        ranks: per ``"<layer>.<role>"`` or ``"embeddings"``, the rank of the two thin
            factors that replace the matrix (low-rank factorisation).
        shared: roles whose input-side factor is one matrix shared by every kept layer
            (the linear autoencoder compresses a role's matrices together).
        coded: per role in :data:`OFFLINE_ROLES`, a non-linear autoencoder's decoder
            (``{"latent": k, "hidden": [...]}``): the role's matrices are stored as codes
            and decoded once at load time; the architecture is unchanged.
        qk: per original layer index, the query/key dimensions kept (intra-attention
            pruning, GRAIN): flat indices ``head * head_size + i`` into the base model's
            query (and key) outputs; a head's kept dimensions are those in its range, so
            each head keeps its own number. May be empty (uniform attention).
        vo: the same for the value/output dimensions (a value row and the matching input
            column of the attention output). A head with no value dimension is gone.
            A layer named here keeps at least one.
    """

    num_layers: int
    removed: tuple[int, ...] = ()
    heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    neurons: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    blocks: Mapping[str, BlockMask] = field(default_factory=dict)
    ranks: Mapping[str, int] = field(default_factory=dict)
    shared: tuple[str, ...] = ()
    coded: Mapping[str, Mapping] = field(default_factory=dict)
    qk: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    vo: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "removed", _indices(self.removed, "removed layers"))
        for name in ("heads", "neurons"):
            value = {int(k): _indices(v, f"{name} of layer {k}")
                     for k, v in dict(getattr(self, name)).items()}
            for layer, kept in value.items():
                if not kept:
                    raise GlpError(f"layer {layer} keeps no {name}: a plan keeps at least one "
                                   "per remaining layer (remove the layer instead)")
            object.__setattr__(self, name, dict(sorted(value.items())))
        object.__setattr__(self, "blocks", dict(sorted(dict(self.blocks).items())))
        for layer in (*self.removed, *self.heads, *self.neurons):
            if not 0 <= layer < self.num_layers:
                raise GlpError(f"plan names layer {layer}, but the model has {self.num_layers} "
                               f"encoder layers (0..{self.num_layers - 1})")
        if len(self.removed) >= self.num_layers:
            raise GlpError(f"a plan must keep at least one of the {self.num_layers} layers")
        for key in self.blocks:
            layer, _, role = key.partition(".")
            if not layer.isdigit() or role not in ROLES:
                raise GlpError(f"block mask '{key}': name it '<layer>.<role>' with a role in "
                               f"{', '.join(ROLES)}")
            if int(layer) >= self.num_layers or int(layer) in self.removed:
                raise GlpError(f"block mask '{key}' names layer {layer}, which the plan does "
                               f"not keep (it keeps {list(self.kept_layers)})")
        self._check_dims()
        self._check_offline()

    def _check_dims(self) -> None:
        for name in ("qk", "vo"):
            value = {int(k): _indices(v, f"{name} dimensions of layer {k}")
                     for k, v in dict(getattr(self, name)).items()}
            for layer, kept in value.items():
                if not 0 <= layer < self.num_layers or layer in self.removed:
                    raise GlpError(f"{name} dimensions name layer {layer}, which the plan "
                                   f"does not keep (it keeps {list(self.kept_layers)})")
                if name == "vo" and not kept:
                    raise GlpError(f"layer {layer} keeps no value/output dimension: a plan "
                                   "keeps at least one per remaining layer")
                if layer in self.heads:
                    raise GlpError(f"layer {layer} has both kept heads and kept dimensions; "
                                   "name a layer's attention one way")
            object.__setattr__(self, name, dict(sorted(value.items())))
        for key in (*self.blocks, *self.ranks):
            layer, _, role = key.partition(".")
            if (role in ("query", "key", "value", "output") and layer.isdigit()
                    and int(layer) in {*self.qk, *self.vo}):
                raise GlpError(f"'{key}': a layer cut inside its heads (qk/vo dimensions) "
                               "cannot also have its attention matrices block-pruned or "
                               "factorised")

    def _check_offline(self) -> None:
        ranks = {}
        for key, rank in dict(self.ranks).items():
            _rank_key(key, self.num_layers, self.removed, "rank")
            if isinstance(rank, bool) or int(rank) != rank or int(rank) < 1:
                raise GlpError(f"rank of '{key}' must be a whole number >= 1, got {rank!r}")
            if key in self.blocks:
                raise GlpError(f"'{key}' has both a rank and a block mask; a matrix is either "
                               "factorised or block-pruned")
            ranks[key] = int(rank)
        object.__setattr__(self, "ranks", dict(sorted(ranks.items())))
        shared = tuple(sorted(set(self.shared)))
        for role in shared:
            keys = [f"{layer}.{role}" for layer in self.kept_layers]
            values = {self.ranks.get(k) for k in keys}
            if role not in ROLES or len(values) != 1 or None in values:
                raise GlpError(f"shared factor '{role}': a shared role needs one rank in every "
                               "kept layer")
        object.__setattr__(self, "shared", shared)
        coded = {}
        for role, spec in dict(self.coded).items():
            if role not in OFFLINE_ROLES:
                raise GlpError(f"coded '{role}': choose a role in {', '.join(OFFLINE_ROLES)}")
            try:
                latent, hidden = int(spec["latent"]), [int(h) for h in spec.get("hidden", [])]
            except (KeyError, TypeError, ValueError):
                raise GlpError(f"coded '{role}': needs {{'latent': k, 'hidden': [...]}}, got "
                               f"{spec!r}") from None
            if latent < 1 or any(h < 1 for h in hidden):
                raise GlpError(f"coded '{role}': sizes must be >= 1, got {spec!r}")
            if any(k == role or k.endswith(f".{role}") for k in self.ranks):
                raise GlpError(f"'{role}' is both factorised and coded; choose one")
            if any(k.endswith(f".{role}") for k in self.blocks):
                raise GlpError(f"'{role}' is both block-pruned and coded; choose one")
            coded[role] = {"latent": latent, "hidden": hidden}
        object.__setattr__(self, "coded", dict(sorted(coded.items())))

    # --- construction and composition ------------------------------------------------

    @classmethod
    def layers(cls, num_layers: int, removed: Iterable[int] = ()) -> Plan:
        """The plan that removes whole layers only (what layer pruning produces)."""
        return cls(num_layers=num_layers, removed=tuple(removed))

    def compose(self, other: Plan) -> Plan:
        """This plan, then ``other`` (both in the base model's indices): layers removed by
        either, heads and neurons kept by both, the block masks of both on the layers that
        remain. Blocks fit a matrix's shape, so ``self``'s block masks cannot survive
        ``other`` narrowing their layer.

        Raises:
            GlpError: plans of different depths, a layer left with no head or neuron, or
                block masks of a layer that ``other`` narrows.
        """
        if other.num_layers != self.num_layers:
            raise GlpError(f"cannot compose plans of {self.num_layers} and "
                           f"{other.num_layers} layers")
        removed = set(self.removed) | set(other.removed)

        def meet(name: str) -> dict:
            out = dict(getattr(self, name))
            for layer, kept in getattr(other, name).items():
                out[layer] = tuple(sorted(set(out[layer]) & set(kept))) if layer in out else kept
                if not out[layer] and layer not in removed and name != "qk":
                    raise GlpError(f"composing plans leaves layer {layer} with no {name}: "
                                   "the two plans keep disjoint sets")
            return {k: v for k, v in out.items() if k not in removed}

        narrowed = set(other.heads) | set(other.neurons) | set(other.qk) | set(other.vo)
        for key in self.blocks:
            if int(key.partition(".")[0]) in narrowed:
                raise GlpError(f"cannot compose: block mask '{key}' fits its layer's shape, "
                               "which the second plan narrows; prune blocks last")
        blocks = {k: v for k, v in {**self.blocks, **other.blocks}.items()
                  if int(k.partition(".")[0]) not in removed}
        if self.ranks or self.coded:
            raise GlpError("cannot compose after a factorised or coded plan: offline "
                           "compression comes last")
        ranks = {k: v for k, v in other.ranks.items()
                 if k == EMBEDDINGS or int(k.partition(".")[0]) not in removed}
        return Plan(self.num_layers, tuple(removed), meet("heads"), meet("neurons"), blocks,
                    ranks, other.shared, other.coded, meet("qk"), meet("vo"))

    # --- facts ----------------------------------------------------------------------

    @property
    def kept_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in set(self.removed))

    @property
    def depth(self) -> int:
        return len(self.kept_layers)

    @property
    def is_layers_only(self) -> bool:
        """True when a plain transformers config can describe the result."""
        return not (self.heads or self.neurons or self.blocks or self.ranks or self.coded
                    or self.qk or self.vo)

    @property
    def kind(self) -> str:
        parts = [name for name, on in (("layers", self.removed), ("heads", self.heads),
                                       ("dims", self.qk or self.vo),
                                       ("neurons", self.neurons), ("blocks", self.blocks),
                                       ("ranks", self.ranks), ("coded", self.coded)) if on]
        return "+".join(parts) or "none"

    def width_part(self) -> Plan:
        """This plan without its offline part (ranks, shared factors, codes)."""
        return Plan(self.num_layers, self.removed, self.heads, self.neurons, self.blocks,
                    qk=self.qk, vo=self.vo)

    def offline(self, ranks: Mapping[str, int] | None = None, shared: Iterable[str] = (),
                coded: Mapping[str, Mapping] | None = None) -> Plan:
        """This plan with offline compression added (ranks, shared factors, codes)."""
        if self.ranks or self.coded:
            raise GlpError("this model is already compressed offline; compress the model "
                           "it came from")
        return Plan(self.num_layers, self.removed, self.heads, self.neurons, self.blocks,
                    dict(ranks or {}), tuple(shared), dict(coded or {}), self.qk, self.vo)

    # --- serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "num_layers": self.num_layers,
            "removed": list(self.removed),
            "heads": {str(k): list(v) for k, v in self.heads.items()},
            "neurons": {str(k): list(v) for k, v in self.neurons.items()},
            "blocks": {k: {"size": b.size, "rows": b.rows, "cols": b.cols, "bits": b.bits}
                       for k, b in self.blocks.items()},
            **({"ranks": dict(self.ranks)} if self.ranks else {}),
            **({"shared": list(self.shared)} if self.shared else {}),
            **({"coded": {k: dict(v) for k, v in self.coded.items()}} if self.coded else {}),
            **({"qk": {str(k): list(v) for k, v in self.qk.items()}} if self.qk else {}),
            **({"vo": {str(k): list(v) for k, v in self.vo.items()}} if self.vo else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        if not isinstance(data, Mapping):
            raise GlpError(f"not a glp plan: expected a JSON object, got {type(data).__name__}")
        version = data.get("format", FORMAT)
        if not isinstance(version, int) or isinstance(version, bool):
            raise GlpError(f"not a glp plan: format {version!r} is not a number")
        if version > FORMAT:
            raise GlpError(f"plan format {version} is newer than this glp understands "
                           f"({FORMAT}); upgrade glp")
        if "num_layers" not in data:
            raise GlpError("not a glp plan: it has no num_layers")
        blocks = {}
        for key, block in _mapping(data, "blocks", "block masks").items():
            if not isinstance(block, Mapping) or not isinstance(block.get("bits"), str):
                raise GlpError(f"not a glp plan: blocks {key!r} must be an object with size, "
                               f"rows, cols and bits, got {_shown(block)}")
            blocks[key] = BlockMask(*(_whole(block.get(f), f"blocks {key!r} {f}")
                                      for f in ("size", "rows", "cols")), block["bits"])
        return cls(
            num_layers=_whole(data["num_layers"], "num_layers"),
            removed=_wholes(data.get("removed", ()), "removed", "layer numbers"),
            heads=_layer_lists(data, "heads", "head indices"),
            neurons=_layer_lists(data, "neurons", "FFN neuron indices"),
            blocks=blocks,
            ranks={k: _whole(v, f"ranks {k!r}")
                   for k, v in _mapping(data, "ranks", "ranks").items()},
            shared=tuple(str(v) for v in _list(data.get("shared", ()), "shared", "roles")),
            coded=dict(_mapping(data, "coded", "autoencoder settings")),
            qk=_layer_lists(data, "qk", "query/key dimensions"),
            vo=_layer_lists(data, "vo", "value/output dimensions"),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GlpError(f"a plan must be JSON: {exc}") from None
        return cls.from_dict(data)

    @property
    def key(self) -> str:
        """A stable 16-hex hash (for cache keys)."""
        return stable_hash("plan", self.to_dict())

    def __hash__(self) -> int:
        return hash(self.key)

    # --- sizes ------------------------------------------------------------------------

    def parameter_counts(self, config: PretrainedConfig) -> dict[str, int]:
        """Exact parameter counts of a sequence classifier of ``config`` cut to this plan.

        Built on the meta device (no memory, no weights), so it takes milliseconds.

        Returns:
            ``parameters`` (the whole model, dense), ``encoder`` (the encoder layers'
            parameters), ``encoder_base`` (the same for the unpruned model), and
            ``zeroed`` (weights inside pruned blocks, stored as zeros).
        """
        return _counts(config, self)

    def encoder_density(self, config: PretrainedConfig) -> float:
        """The fraction of the base encoder layers' weights this plan keeps (non-zero)."""
        return density_of(self.parameter_counts(config))


def density_of(counts: Mapping[str, int]) -> float:
    """The encoder density of :meth:`Plan.parameter_counts`' result."""
    return (counts["encoder"] - counts["zeroed"]) / counts["encoder_base"]


def _counts(config, plan: Plan) -> dict[str, int]:
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from glp.core.anatomy import encoder_layers, kept_layers, role_module
    from glp.core.surgery import apply_plan, zeroed_weights

    def encoder_params(model) -> int:
        return sum(p.numel() for p in encoder_layers(model).parameters())

    # A copy: the model shares its config, and cutting layers rewrites the config.
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(copy.deepcopy(config))
    base = encoder_params(model)
    apply_plan(model, plan, factor=None)  # shapes only
    zeroed = 0
    position = {original: p for p, original in enumerate(kept_layers(model))}
    for key, mask in plan.blocks.items():
        layer, _, role = key.partition(".")
        if int(layer) in position:
            linear = role_module(model, encoder_layers(model)[position[int(layer)]], role)
            zeroed += zeroed_weights(mask, linear.weight.shape)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "encoder": encoder_params(model), "encoder_base": base, "zeroed": zeroed}


def plan_of_model(model) -> Plan:
    """The plan a model was cut to (a layers-only plan from its config record if none)."""
    plan = getattr(model, PLAN_ATTR, None)
    if plan is not None:
        return plan
    return Plan.layers(len(kept_layers(model)) + len(removed_layers(model)),
                       removed_layers(model))




ATTENTION_ROLES = ("query", "key", "value", "output")


def check_factorisable(plan: Plan | None, roles: Iterable[str]) -> None:
    """Refuse what offline compression cannot do to a compressed model: matrices already
    factorised or coded, and the attention matrices of a layer cut inside its heads."""
    if plan is None:
        return
    if plan.ranks or plan.coded:
        done = sorted({k.partition(".")[2] or k for k in (*plan.ranks, *plan.coded)})
        raise GlpError(f"this model already has factorised matrices ({', '.join(done)}); "
                       "compress a model without (for GRAIN, an embedding rank of 0 keeps "
                       "the embeddings whole)")
    attention = [m for m in roles if m in ATTENTION_ROLES]
    if (plan.qk or plan.vo) and attention:
        raise ParamError("modules", ",".join(attention), (
            "other matrices, e.g. ffn_in,ffn_out (this model was pruned inside its attention "
            "heads, whose matrices have per-head widths)"))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value, where: str) -> int:
    """A whole number of a plan (a JSON number, or a layer key such as ``"3"``)."""
    if isinstance(value, bool) or not (isinstance(value, int) or (
            isinstance(value, str) and value.lstrip("-").isdigit())):
        raise GlpError(f"not a glp plan: {where} must be a whole number, got {_shown(value)}")
    return int(value)


def _list(value, field: str, what: str) -> list:
    if not isinstance(value, list | tuple):
        raise GlpError(f"not a glp plan: {field} must be a list of {what}, got {_shown(value)}")
    return list(value)


def _wholes(value, field: str, what: str) -> tuple[int, ...]:
    return tuple(_whole(v, f"each of {field}") for v in _list(value, field, what))


def _mapping(data: Mapping, field: str, what: str) -> Mapping:
    value = data.get(field, {})
    if not isinstance(value, Mapping):
        raise GlpError(f"not a glp plan: {field} must be an object of {what}, got "
                       f"{_shown(value)}")
    return value


def _layer_lists(data: Mapping, field: str, what: str) -> dict[int, tuple[int, ...]]:
    """``{"3": [0, 5, ...]}``: per layer number, a list of indices."""
    return {_whole(layer, f"{field}: layer {layer!r}"):
            _wholes(items, f"{field} of layer {layer}", what)
            for layer, items in _mapping(data, field, f"layer numbers to lists of {what}"
                                         ).items()}
