"""The autoencoder of a module type's matrices: training, latent sizes, folding a linear
decoder into thin layers (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from glp.core.codes import (
    CODES_FILE,
    Coded,
    _assign,
    _mlp,
    _rescale,
    decode_into,
    decoder_for,
    rows_of,
)
from glp.core.errors import GlpError, ParamError
from glp.core.factors import LowRankEmbedding, LowRankLinear, matrices
from glp.core.plan import EMBEDDINGS, ROLES
from glp.methods import Context, Outcome
from glp.methods.autoencoder import DECODERS, AutoencoderParams


@dataclass(frozen=True)
class AutoencoderConfig:
    """The reference's settings (configs/config.yaml: 20 epochs plus 10 additional), by
    default."""

    ratio: float = 10.0
    decoder: str = "nonlinear"
    encoder_sizes: tuple[int, ...] = (8, 4)  # relative to the latent size
    decoder_sizes: tuple[int, ...] = (2, 4)
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    step_size: int = 10
    gamma: float = 0.8
    cosine_weight: float = 0.9091
    l2_weight: float = 0.0909
    seed: int = 0

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ParamError("decoder", repr(self.decoder), f"one of {', '.join(DECODERS)}")
        if not self.ratio > 1:
            raise ParamError("ratio", f"{self.ratio:g}", "a compression ratio > 1")
        if self.epochs < 1 or self.batch_size < 1:
            raise GlpError("the autoencoder needs at least 1 epoch and a batch of 1 row")


def _storage(rows: int, width: int, latent: int, hidden: Sequence[int]) -> int:
    decoder = decoder_for(latent, hidden, width) if latent else None
    params = sum(p.numel() for p in decoder.parameters()) if decoder is not None else 0
    return rows * latent + params + rows  # codes, decoder, row norms


def latent_size(rows: int, width: int, config: AutoencoderConfig) -> tuple[int, list[int]]:
    """The largest latent size (and hidden sizes) whose storage is at most ``1/ratio`` of
    a ``rows x width`` matrix.

    Raises:
        GlpError: not even a latent size of 1 fits.
    """
    budget = rows * width / config.ratio

    def hidden(x: int) -> list[int]:
        return [] if config.decoder == "linear" else [s * x for s in config.decoder_sizes]

    best = 0
    low, high = 1, max(1, width)
    while low <= high:  # storage grows with the latent size
        mid = (low + high) // 2
        if _storage(rows, width, mid, hidden(mid)) <= budget:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    if best < 1:
        raise ParamError("ratio", f"{config.ratio:g}", (
            f"a smaller ratio (a {config.decoder} autoencoder of a {rows}x{width} matrix "
            f"needs more than 1/{config.ratio:g} of it even at latent size 1)"))
    return best, hidden(best)


def _loss(output: torch.Tensor, target: torch.Tensor, config: AutoencoderConfig):
    cosine = 1.0 - nn.functional.cosine_similarity(output, target, dim=-1, eps=1e-6)
    rmse = (output - target).pow(2).mean().sqrt()
    return config.cosine_weight * cosine.mean() + config.l2_weight * rmse


def train_autoencoder(model: nn.Module, role: str, config: AutoencoderConfig,
                      on_epoch: Callable[[int, int, float], None] | None = None) -> Coded:
    """Train an autoencoder on one module type's matrices (concatenated over layers).

    After each epoch the reconstruction loss of every row is measured; the epoch with the
    lowest wins (the first of equals). ``model`` ends with the winner's decoded weights
    (dense); the result says how to store them.
    """
    import time

    started = time.perf_counter()
    keys, counts, target = rows_of(model, role)
    target = target.to(torch.float32).cpu()
    rows, width = target.shape
    latent, hidden = latent_size(rows, width, config)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        sizes = [s * latent for s in config.encoder_sizes]
        encoder = (_mlp([width, *sizes, latent], nn.LeakyReLU()) if hidden
                   else _mlp([width, latent], None))
        decoder = decoder_for(latent, hidden, width)
    norms = target.norm(dim=-1)
    parameters = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    losses: list[float] = []
    best: tuple[float, tuple | None] = (math.inf, None)
    best_epoch = 0
    for epoch in range(config.epochs):
        encoder.train()
        decoder.train()
        order = torch.randperm(rows, generator=generator)
        total = 0.0
        for start in range(0, rows, config.batch_size):
            batch = target[order[start:start + config.batch_size]]
            optimizer.zero_grad()
            out = _rescale(decoder(encoder(batch)), norms[order[start:start + config.batch_size]])
            loss = _loss(out, batch, config)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        schedule.step()
        with torch.no_grad():
            codes = encoder(target)
            losses.append(float(_loss(_rescale(decoder(codes), norms), target, config)))
        if not all(math.isfinite(v) for v in (losses[-1], total)):
            raise GlpError(f"the {role} autoencoder diverged (loss {losses[-1]}) at epoch "
                           f"{epoch + 1}")
        if losses[-1] < best[0]:
            best = (losses[-1], (codes.clone(), {k: v.clone() for k, v in
                                                 decoder.state_dict().items()}))
            best_epoch = epoch + 1
        if on_epoch is not None:
            on_epoch(epoch + 1, config.epochs, losses[-1])
    codes, state = best[1]
    decoder.load_state_dict(state)
    decoder.eval()
    coded = Coded(role=role, keys=keys, rows_per_key=counts, codes=codes, norms=norms,
                  decoder=decoder, latent=latent, hidden=hidden, epochs=config.epochs,
                  best_epoch=best_epoch, losses=losses, scores=[],
                  seconds=time.perf_counter() - started)
    _assign(model, role, keys, counts, coded.decode())
    return coded


def fold_linear(model: nn.Module, coded: Coded) -> dict[str, int]:
    """Replace a linearly coded role's matrices by thin factors (exact): every layer gets
    ``first`` = ``[D^T; b^T]`` (shared) and ``second`` = ``diag(a) [C_l, 1]``.

    Returns the plan's ranks for the role.
    """
    from glp.core.anatomy import encoder_layers, kept_layers, set_module
    from glp.core.factors import role_path

    if coded.hidden:
        raise GlpError("only a linear decoder factorises")
    linear = coded.decoder[0]
    with torch.no_grad():
        raw = linear(coded.codes)
        scale = coded.norms / raw.norm(dim=-1).clamp_min(1e-12)
        first = torch.cat([linear.weight.T, linear.bias.unsqueeze(0)])  # (x+1) x m
        second = torch.cat([coded.codes, torch.ones(len(coded.codes), 1)], 1) * scale[:, None]
    rank = first.shape[0]
    ranks = {}
    if coded.role == EMBEDDINGS:
        embedding = matrices(model, [EMBEDDINGS])[EMBEDDINGS]
        module = LowRankEmbedding(embedding.num_embeddings, embedding.embedding_dim, rank,
                                  padding_idx=embedding.padding_idx,
                                  device=embedding.weight.device, dtype=embedding.weight.dtype)
        with torch.no_grad():
            module.codes.weight.copy_(second)
            module.project.weight.copy_(first.T)
        model.base_model.embeddings.word_embeddings = module
        return {EMBEDDINGS: rank}
    found = matrices(model, [coded.role])
    weight = next(iter(found.values())).weight
    shared = nn.Linear(first.shape[1], rank, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        shared.weight.copy_(first)
    position = {original: p for p, original in enumerate(kept_layers(model))}
    for key, part in zip(coded.keys, torch.split(second, coded.rows_per_key), strict=True):
        old = found[key]
        module = LowRankLinear(old.in_features, old.out_features, rank,
                               bias=old.bias is not None, first=shared,
                               device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.second.weight.copy_(part)
            if old.bias is not None:
                module.second.bias.copy_(old.bias)
        layer = encoder_layers(model)[position[int(key.partition(".")[0])]]
        set_module(layer, role_path(model, coded.role), module)
        ranks[key] = rank
    return ranks


__all__ = ["CODES_FILE", "DECODERS", "AutoencoderConfig", "Coded", "decode_into",
           "fine_tune_coded", "fold_linear", "latent_size", "train_autoencoder", "ROLES"]


def config_for(params: AutoencoderParams, seed: int = 0) -> AutoencoderConfig:
    return AutoencoderConfig(ratio=params.ratio, decoder=params.decoder, epochs=params.epochs,
                             batch_size=params.batch_size, seed=seed)


class _Rows(nn.Module):
    """A coded role while it fine-tunes: its codes (trainable), norms and decoder."""

    def __init__(self, coded: Coded):
        super().__init__()
        self.codes = nn.Parameter(coded.codes.detach().clone())
        self.register_buffer("norms", coded.norms.detach().clone())
        self.decoder = coded.decoder


class _DecodedRows(nn.Module):
    """The parametrization of one matrix of a coded role: its rows, decoded from their
    codes in every forward pass (the stored weight is ignored)."""

    def __init__(self, rows: _Rows, start: int, stop: int):
        super().__init__()
        self.rows, self.start, self.stop = rows, start, stop

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        decoded = rows.decoder(rows.codes[self.start:self.stop])
        return _rescale(decoded, rows.norms[self.start:self.stop]).to(weight.dtype)


def fine_tune_coded(model: nn.Module, coded: dict[str, Coded], dataset, config, seed: int,
                    device: str = "cpu", on_step: Callable[[int, int], None] | None = None):
    """Fine-tune a compressed ``model`` on the task, in place (``config`` is the job's
    fine-tune config, with the phase's epochs): every weight trains, and a coded role's
    codes and decoder train in its place, its matrices decoded from them in each forward
    pass (:mod:`torch.nn.utils.parametrize`). Afterwards each role's trained codes are in
    ``coded`` and its matrices are their decoding, as ``glp.load_pretrained`` decodes them.
    A linearly coded role is already thin factors, which train as any weight.

    Returns the training statistics (:class:`glp.training.train.TrainStats`).
    """
    from torch.nn.utils import parametrize

    from glp.training.train import fine_tune

    owners: dict[str, list[nn.Module]] = {}
    rows: dict[str, _Rows] = {}
    for role, result in coded.items():
        rows[role] = _Rows(result)
        found = matrices(model, [role])
        start = 0
        for key, count in zip(result.keys, result.rows_per_key, strict=True):
            module = found[key]
            parametrize.register_parametrization(
                module, "weight", _DecodedRows(rows[role], start, start + count))
            module.parametrizations.weight.original.requires_grad_(False)
            owners.setdefault(role, []).append(module)
            start += count
    try:
        stats = fine_tune(model, dataset, config, seed=seed, device=device, on_step=on_step)
    finally:
        for role, modules in owners.items():
            for module in modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                module.weight.requires_grad_(True)
            trained = rows[role]
            result = coded[role]
            result.decoder = trained.decoder.cpu().eval()
            result.codes = trained.codes.detach().cpu().clone()
            if result.decode().isfinite().all():
                _assign(model, role, result.keys, result.rows_per_key, result.decode())
    return stats


def check(model: nn.Module, params: AutoencoderParams) -> None:
    """Refuse a model or a ratio this method cannot compress (on a meta-device copy)."""
    from glp.core.plan import check_factorisable, plan_of_model

    check_factorisable(plan_of_model(model), params.modules)
    config = config_for(params)
    for role in params.modules:
        found = matrices(model, [role]).values()
        rows = sum(m.weight.shape[0] for m in found)
        latent_size(rows, next(iter(found)).weight.shape[1], config)


def _start(context: Context, params: AutoencoderParams) -> nn.Module:
    """The model to compress: the pre-trained one (to fine-tune afterwards), or with
    ``finetune_epochs=0`` the fine-tuned ``context.model``."""
    if not params.finetune_epochs:
        return context.model
    hint = ("--ae-finetune-epochs 0 compresses the fine-tuned model as given, with no "
            "fine-tuning")
    if context.pretrained is None:
        raise GlpError(f"the autoencoder with fine-tuning compresses the pre-trained model, "
                       f"and this run has none; {hint}")
    try:
        return context.pretrained()
    except GlpError as exc:
        raise GlpError(f"{exc} ({hint})") from exc


def run(context: Context, params: AutoencoderParams) -> Outcome:
    """One autoencoder per module type, each kept at its epoch of lowest reconstruction
    loss; then (``finetune_epochs`` > 0, the reference's recipe) the compressed model,
    which started as the pre-trained model, fine-tunes on the task with its codes and
    decoders (or linear factors) trainable. With ``finetune_epochs=0`` the fine-tuned
    ``context.model`` is compressed in place, with no training on the task."""
    from glp.core.checkpoint import CODES_ATTR
    from glp.core.plan import plan_of_model
    from glp.methods import FROM_PRETRAINED, phase_record

    model = _start(context, params)
    base = plan_of_model(model)
    config = config_for(params, context.seed)
    ranks, shared, coded, codes, phases = {}, [], {}, {}, []
    for role in params.modules:
        on_step, close = context.progress(f"autoencoder ratio {params.ratio:g}: {role}")
        try:
            result = train_autoencoder(
                model, role, config,
                on_epoch=lambda epoch, total, loss, step=on_step: step(epoch, total))
        except GlpError as exc:
            if "diverged" not in str(exc):
                raise
            phases.append({"phase": role, "steps": 0, "seconds": 0.0,
                           "final_loss": float("nan"), "diverged": True})
            return Outcome(model, base, phases, diverged=True)
        finally:
            close()
        phases.append({"phase": role, "steps": result.epochs,
                       "seconds": round(result.seconds, 3),
                       "final_loss": result.losses[result.best_epoch - 1],
                       "diverged": False, "latent": result.latent,
                       "best_epoch": result.best_epoch, "stored": result.stored})
        if params.decoder == "linear":
            ranks.update(fold_linear(model, result))
            if role != EMBEDDINGS:
                shared.append(role)
        else:
            coded[role] = {"latent": result.latent, "hidden": result.hidden}
            codes[role] = result
    plan = base.offline(ranks, shared, coded)
    if params.finetune_epochs:
        phase = context.config.__class__(**{**context.config.to_dict(),
                                            "epochs": params.finetune_epochs})
        on_step, close = context.progress(f"autoencoder ratio {params.ratio:g}: fine-tune")
        try:
            stats = fine_tune_coded(model, codes, context.train, phase, context.seed,
                                    context.device, on_step)
        finally:
            close()
        phases.append(phase_record("finetune", stats))
        if stats.diverged:
            return Outcome(model, plan, phases, diverged=True)
    setattr(model, CODES_ATTR, codes)
    # the paper's protocol: the pre-trained model, compressed and fine-tuned; the
    # fine-tuned source was not used
    return Outcome(model, plan, phases,
                   details={FROM_PRETRAINED: 1} if params.finetune_epochs else {})
