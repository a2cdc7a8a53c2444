"""Coded weights: an autoencoder's codes and decoder per module type, decoded back into
dense weights at load time (what a plan's ``coded`` roles need to reload)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from glp.core.errors import GlpError
from glp.core.factors import matrices

CODES_FILE = "glp_codes.safetensors"
"""The file beside the weights that holds a coded model's codes, norms and decoders."""


def _mlp(sizes: Sequence[int], final: nn.Module | None) -> nn.Sequential:
    parts: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        parts.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            parts.append(nn.LeakyReLU())
    if final is not None:
        parts.append(final)
    return nn.Sequential(*parts)


def decoder_for(latent: int, hidden: Sequence[int], width: int) -> nn.Sequential:
    """The decoder of a plan's ``coded`` entry (``hidden`` empty: linear)."""
    if not hidden:
        return _mlp([latent, width], None)
    return _mlp([latent, *hidden, width], nn.Tanh())


@dataclass
class Coded:
    """One module type, coded: the keys of its matrices (in row order), codes, norms, the
    trained decoder, and what training did."""

    role: str
    keys: list[str]
    rows_per_key: list[int]
    codes: torch.Tensor
    norms: torch.Tensor
    decoder: nn.Sequential
    latent: int
    hidden: list[int]
    epochs: int
    best_epoch: int
    losses: list[float]
    scores: list[float]
    seconds: float

    def decode(self) -> torch.Tensor:
        with torch.no_grad():
            return _rescale(self.decoder(self.codes), self.norms)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{self.role}.codes": self.codes.contiguous(),
               f"{self.role}.norms": self.norms.contiguous()}
        for name, value in self.decoder.state_dict().items():
            out[f"{self.role}.decoder.{name}"] = value.contiguous()
        return out

    @property
    def stored(self) -> int:
        return sum(t.numel() for t in self.tensors().values())


def _rescale(rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return rows * (norms / rows.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1)


def rows_of(model: nn.Module, role: str) -> tuple[list[str], list[int], torch.Tensor]:
    """The stacked rows of one module type's matrices (weights as ``out x in``; the word
    embeddings as ``tokens x hidden``), with their keys."""
    found = matrices(model, [role])
    if not found:
        raise GlpError(f"the model has no '{role}' matrices")
    weights = [m.weight.detach() for m in found.values()]
    return list(found), [w.shape[0] for w in weights], torch.cat(weights)


def _assign(model: nn.Module, role: str, keys: Sequence[str], counts: Sequence[int],
            decoded: torch.Tensor) -> None:
    found = matrices(model, [role])
    with torch.no_grad():
        for key, part in zip(keys, torch.split(decoded, list(counts)), strict=True):
            weight = found[key].weight
            weight.copy_(part.to(weight))


def decode_into(model: nn.Module, coded_spec: Mapping[str, Mapping],
                tensors: Mapping[str, torch.Tensor]) -> dict[str, Coded]:
    """Decode a saved model's coded roles into its dense weights (load time); returns the
    codes per role (so that the model saves again as it was stored)."""
    out = {}
    for role, spec in coded_spec.items():
        try:
            codes, norms = tensors[f"{role}.codes"], tensors[f"{role}.norms"]
        except KeyError:
            raise GlpError(f"the codes of '{role}' are missing from {CODES_FILE}") from None
        keys, counts, current = rows_of(model, role)
        if len(codes) != current.shape[0]:
            raise GlpError(f"{CODES_FILE}: '{role}' has {len(codes)} codes for "
                           f"{current.shape[0]} rows")
        decoder = decoder_for(int(spec["latent"]), list(spec.get("hidden", [])),
                              current.shape[1])
        prefix = f"{role}.decoder."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            decoder.load_state_dict(state)
        except RuntimeError as exc:
            raise GlpError(f"{CODES_FILE}: the decoder of '{role}' does not match its plan "
                           f"({str(exc).splitlines()[0]})") from None
        with torch.no_grad():
            decoded = _rescale(decoder(codes.float()), norms.float())
        _assign(model, role, keys, counts, decoded)
        out[role] = Coded(role=role, keys=keys, rows_per_key=counts, codes=codes.float(),
                          norms=norms.float(), decoder=decoder.eval(),
                          latent=int(spec["latent"]), hidden=list(spec.get("hidden", [])),
                          epochs=0, best_epoch=0, losses=[], scores=[], seconds=0.0)
    return out


def coded_weight_names(model: nn.Module, roles: Sequence[str]) -> set[str]:
    """The state-dict names of the dense weights that coded roles replace on disk."""
    ids = {id(m.weight) for m in matrices(model, list(roles)).values()}
    return {name for name, p in model.named_parameters(remove_duplicate=False)
            if id(p) in ids}


