"""Saving a compressed model with its plan, and rebuilding it from config + plan.

Transformers 5 has no way to describe uneven widths in a config (``prune_heads`` and
``config.pruned_heads`` are gone), so a width-pruned checkpoint is the usual
``save_pretrained`` directory (config, safetensors weights, tokenizer) plus
``glp_plan.json``. :func:`load_pretrained` builds the base architecture from the config,
cuts it to the plan, and only then loads the weights, strictly: every tensor must
match in name and shape. A layers-only directory also loads with plain
``AutoModelForSequenceClassification.from_pretrained``, as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from glp.core.errors import GlpError
from glp.core.plan import PLAN_FILE, Plan

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def save_pretrained(model: PreTrainedModel, directory: str | os.PathLike[str],
                    tokenizer=None) -> Path:
    """Write a model (safetensors), its plan and optionally its tokenizer to ``directory``.

    Returns:
        The directory.
    """
    from glp.core.anatomy import PLAN_ATTR
    from glp.core.models import _quiet_loading
    from glp.core.plan import plan_of_model

    target = Path(directory)
    plan = getattr(model, PLAN_ATTR, None)
    extra = {}
    if plan is not None and plan.shared:  # a shared factor is written once
        extra["state_dict"] = _unique_state(model)
    if plan is not None and plan.coded:  # the coded matrices are stored as codes instead
        state = extra.setdefault("state_dict", _unique_state(model))
        from safetensors.torch import save_file

        from glp.core.codes import CODES_FILE, coded_weight_names

        codes = getattr(model, CODES_ATTR, None) or {}
        missing = sorted(set(plan.coded) - set(codes))
        if missing:
            raise GlpError(f"the plan codes {missing}, but the model carries no codes for them")
        skip = coded_weight_names(model, list(plan.coded))
        extra["state_dict"] = {k: v for k, v in state.items() if k not in skip}
        target.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for role in plan.coded:
            tensors.update({k: v.detach().cpu() for k, v in codes[role].tensors().items()})
        save_file(tensors, str(target / CODES_FILE))
    with _quiet_loading():  # no "Writing model shards" bar for one small file
        model.save_pretrained(target, **extra)  # safetensors
    (target / PLAN_FILE).write_text(plan_of_model(model).to_json() + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


CODES_ATTR = "glp_codes"
"""The attribute under which an autoencoder-compressed model keeps its codes (per role)."""


def _unique_state(model) -> dict:
    """The state dict with each tensor once: a factor shared by several layers is saved
    under its first name only (``load_pretrained`` re-ties the others)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor
    return state


def stored_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of a saved model's weights on disk (safetensors files, codes included)."""
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def saved_parameters(directory: str | os.PathLike[str]) -> int:
    """Parameters of a saved model, read from its safetensors headers (no weights loaded)."""
    import math

    from safetensors import safe_open

    total = 0
    for file in Path(directory).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def read_plan(directory: str | os.PathLike[str]) -> Plan | None:
    """The plan saved in a model directory, or ``None`` when it has none."""
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return Plan.from_json(path.read_text())
    except GlpError as exc:
        raise GlpError(f"{path}: {exc}") from None


def load_pretrained(directory: str | os.PathLike[str], *, trust_remote_code: bool = False,
                    device: str = "cpu") -> PreTrainedModel:
    """Load a sequence classifier saved by glp, whatever its plan (layers, heads, neurons,
    blocks), for every supported family.

    Args:
        directory: a model directory written by :func:`save_pretrained` (or any
            ``save_pretrained`` directory of a supported family: no plan means unpruned
            or layers-only).
        trust_remote_code: passed to transformers for the config.
        device: where the model goes.

    Returns:
        The model in eval mode; it takes the directory's tokenizer outputs and returns
        logits.

    Raises:
        GlpError: not a model directory, an unsupported family, or weights that do not
            match the plan (names or shapes).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from glp.core.models import _quiet_loading, check_supported
    from glp.core.surgery import apply_plan

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise GlpError(f"'{directory}' is not a model directory (no config.json)")
    config = check_supported(path, trust_remote_code=trust_remote_code)
    plan = read_plan(path)
    if plan is None or plan.is_layers_only:
        with _quiet_loading():
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=torch.float32, trust_remote_code=trust_remote_code)
        if plan is not None:
            model.glp_plan = plan
        return model.to(device).eval()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise GlpError(f"'{directory}' has a width plan but no safetensors weights")
    from glp.core.codes import CODES_FILE

    files = [f for f in files if f.name != CODES_FILE]
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    apply_plan(model, plan, factor=None)  # the structure; the weights come from the files
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        raise GlpError(f"the weights in '{directory}' do not match its plan: "
                       f"{' '.join(first[1:3]) or first[0]}") from None
    # Non-persistent buffers are absent from the file by design; anything else is not.
    buffers = {name for name, _ in model.named_buffers()}
    # A shared factor is stored once; its other names are the same tensor.
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    aliases = {n for names in by_tensor.values() if any(m in state for m in names)
               for n in names}
    coded = set()
    if plan.coded:
        from glp.core.codes import coded_weight_names

        coded = coded_weight_names(model, list(plan.coded))
    missing = [k for k in result.missing_keys
               if k not in buffers and k not in aliases and k not in coded]
    if missing or result.unexpected_keys:
        raise GlpError(f"the weights in '{directory}' do not match its plan: missing "
                       f"{missing[:4]}, unexpected {result.unexpected_keys[:4]}")
    if plan.coded:
        from glp.core.codes import decode_into

        if not (path / CODES_FILE).is_file():
            raise GlpError(f"'{directory}' has a coded plan but no {CODES_FILE}")
        setattr(model, CODES_ATTR, decode_into(model, plan.coded,
                                               load_file(str(path / CODES_FILE))))
    return model.to(device).eval()
