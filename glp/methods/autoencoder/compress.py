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
    """The reference's settings (configs/config.yaml), by default."""

    ratio: float = 10.0
    decoder: str = "nonlinear"
    encoder_sizes: tuple[int, ...] = (8, 4)  # relative to the latent size
    decoder_sizes: tuple[int, ...] = (2, 4)
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    step_size: int = 10
    gamma: float = 0.8
    cosine_weight: float = 0.9091
    l2_weight: float = 0.0909
    seed: int = 0
    eval_every: int = 1  # epochs between selection-split evaluations (the last is always)

    def __post_init__(self):
        if self.eval_every < 1:
            raise GlpError(f"eval_every {self.eval_every}: evaluate at least every epoch")
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
                      evaluate: Callable[[], float] | None = None,
                      on_epoch: Callable[[int, int, float, float | None], None] | None = None
                      ) -> Coded:
    """Train an autoencoder on one module type's matrices (concatenated over layers).

    After each epoch the decoded weights are put into ``model`` and ``evaluate()`` (the
    task metric on the selection split, higher is better) is called; the best epoch wins.
    Without ``evaluate`` the lowest loss wins. ``model`` ends with the winner's decoded
    weights (dense); the result says how to store them.
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
    originals = {k: m.weight.detach().clone() for k, m in matrices(model, [role]).items()}
    best = (-math.inf, None)
    losses: list[float] = []
    scores: list[float] = []
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
            decoded = _rescale(decoder(codes), norms)
            losses.append(float(_loss(decoded, target, config)))
        if not all(math.isfinite(v) for v in (losses[-1], total)):
            raise GlpError(f"the {role} autoencoder diverged (loss {losses[-1]}) at epoch "
                           f"{epoch + 1}")
        score = None
        due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        if evaluate is not None and not due:
            if on_epoch is not None:
                on_epoch(epoch + 1, config.epochs, losses[-1], None)
            continue
        if evaluate is not None:
            _assign(model, role, keys, counts, decoded)
            score = float(evaluate())
            scores.append(score)
        candidate = score if score is not None else -losses[-1]
        if not math.isfinite(candidate):  # a NaN score never wins (NaN > x is False)
            candidate = -math.inf
        if candidate > best[0] or best[1] is None:
            best = (candidate, (codes.clone(), {k: v.clone() for k, v in
                                                decoder.state_dict().items()}))
            best_epoch = epoch + 1
        if on_epoch is not None:
            on_epoch(epoch + 1, config.epochs, losses[-1], score)
    codes, state = best[1]
    decoder.load_state_dict(state)
    decoder.eval()
    coded = Coded(role=role, keys=keys, rows_per_key=counts, codes=codes, norms=norms,
                  decoder=decoder, latent=latent, hidden=hidden, epochs=config.epochs,
                  best_epoch=best_epoch, losses=losses, scores=scores,
                  seconds=time.perf_counter() - started)
    if coded.decode().isfinite().all():
        _assign(model, role, keys, counts, coded.decode())
    else:  # pragma: no cover - guarded by the divergence check above
        for key, weight in originals.items():
            _assign(model, role, [key], [weight.shape[0]], weight)
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
           "fold_linear", "latent_size", "train_autoencoder", "ROLES"]


def config_for(params: AutoencoderParams, seed: int = 0) -> AutoencoderConfig:
    return AutoencoderConfig(ratio=params.ratio, decoder=params.decoder, epochs=params.epochs,
                             batch_size=params.batch_size, eval_every=params.eval_every,
                             seed=seed)


def check(model: nn.Module, params: AutoencoderParams) -> None:
    """Refuse a model or a ratio this method cannot compress (on a meta-device copy)."""
    from glp.core.plan import check_factorisable, plan_of_model

    check_factorisable(plan_of_model(model), params.modules)
    config = config_for(params)
    for role in params.modules:
        found = matrices(model, [role]).values()
        rows = sum(m.weight.shape[0] for m in found)
        latent_size(rows, next(iter(found)).weight.shape[1], config)


def run(context: Context, params: AutoencoderParams) -> Outcome:
    """One autoencoder per module type of ``context.model``, in place; the epoch kept is
    the one whose decoded weights score best on the selection split."""
    from glp.core.checkpoint import CODES_ATTR
    from glp.core.plan import plan_of_model

    model, base = context.model, plan_of_model(context.model)
    config = config_for(params, context.seed)
    ranks, shared, coded, codes, phases = {}, [], {}, {}, []
    for role in params.modules:
        on_step, close = context.progress(f"autoencoder ratio {params.ratio:g}: {role}")
        try:
            result = train_autoencoder(
                model, role, config, evaluate=lambda: context.score(model),
                on_epoch=lambda epoch, total, loss, value, step=on_step: step(epoch, total))
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
    setattr(model, CODES_ATTR, codes)
    plan = base.offline(ranks, shared, coded)
    return Outcome(model, plan, phases)
