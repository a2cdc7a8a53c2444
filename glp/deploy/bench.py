"""Inference latency of several models on one batch, measured fairly between them.

Pruning is worth it only if the pruned model is faster, and on a shared CPU one model's
timings can be hit by a stall (another process, frequency scaling) that the next model's
are not. So every model runs on the same padded batch, and the timing rounds interleave
the models round-robin, rotating the order each round: whatever slows the machine down
slows all models alike, and no model is always the first (cold) or last one of a round.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from glp.core.errors import GlpError
from glp.training.data import collate
from glp.training.train import model_device


@dataclass(frozen=True)
class Latency:
    """Forward-pass wall time of one model on one batch, over ``repeats`` timed runs.

    Attributes:
        median_ms: the median, robust to the odd stall; the number to compare models by.
        p90_ms: the 90th percentile (linear interpolation), how bad a slow run gets.
        mean_ms: the mean, which stalls pull up.
        repeats: how many timed runs the statistics are over.
        batch_size: rows in the batch.
        tokens: tokens in the padded batch (rows x padded length), padding included since
            the model computes on it.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    batch_size: int
    tokens: int


def latency_batch(dataset: Any, batch_size: int = 32, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` rows of a tokenised dataset, padded to their longest row.

    Taking the first rows (not a random sample) makes the batch, and so the timings,
    reproducible across runs and models.

    Args:
        dataset: a tokenised ``datasets.Dataset`` (see :func:`glp.training.data.tokenize`).
        batch_size: rows to take (fewer if the dataset is smaller).
        pad_id: the tokenizer's padding id for ``input_ids``.

    Returns:
        Model inputs (``input_ids``, ``attention_mask``, ``token_type_ids`` when present)
        as long tensors; no ``labels``, so a forward pass computes no loss.

    Raises:
        GlpError: ``batch_size`` below 1 or an empty dataset.
    """
    if batch_size < 1:
        raise GlpError(f"batch_size must be at least 1, got {batch_size!r}")
    if len(dataset) == 0:
        raise GlpError("cannot build a latency batch from an empty dataset")
    rows = dataset.select(range(min(batch_size, len(dataset))))
    batch = collate(rows, range(len(rows)), pad_id)
    batch.pop("labels", None)
    return batch


def measure_latency(
    models: Mapping[str, torch.nn.Module],
    batch: Mapping[str, torch.Tensor],
    *,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, Latency]:
    """Time each model's forward pass on ``batch``, interleaving the models round-robin.

    Every model is put in eval mode (its previous mode is restored afterwards) and runs
    under ``torch.inference_mode``. Each model first runs ``warmup`` untimed passes (lazy
    initialisation, allocator and cache warm-up); then come ``repeats`` rounds in which
    every model runs once, the order rotated by one each round. Each pass is timed with
    ``time.perf_counter`` (after a device synchronisation on CUDA).

    Args:
        models: name -> model; all get the same batch.
        batch: model inputs, e.g. from :func:`latency_batch` (moved to each model's device
            before timing).
        repeats: timed runs per model.
        warmup: untimed runs per model before the timed rounds.

    Returns:
        name -> latency statistics in milliseconds, in the order of ``models``.

    Raises:
        GlpError: no models, ``repeats`` below 1, ``warmup`` below 0, or a batch without
            ``input_ids``.
    """
    if not models:
        raise GlpError("no models to time")
    if repeats < 1:
        raise GlpError(f"repeats must be at least 1, got {repeats!r}")
    if warmup < 0:
        raise GlpError(f"warmup must be at least 0, got {warmup!r}")
    if "input_ids" not in batch:
        raise GlpError(f"the batch has no input_ids (it has: {', '.join(batch) or 'nothing'})")
    names = list(models)
    inputs = {name: {k: v.to(model_device(models[name])) for k, v in batch.items()}
              for name in names}
    modes = {name: models[name].training for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}

    def run(name: str) -> float:
        sync = model_device(models[name]).type == "cuda"
        start = time.perf_counter()
        models[name](**inputs[name])
        if sync:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000.0

    try:
        with torch.inference_mode():
            for name in names:
                models[name].eval()
                for _ in range(warmup):
                    run(name)
            for round_ in range(repeats):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    times[name].append(run(name))
    finally:
        for name in names:
            models[name].train(modes[name])

    input_ids = batch["input_ids"]
    return {
        name: Latency(
            median_ms=float(np.median(times[name])),
            p90_ms=float(np.percentile(times[name], 90)),
            mean_ms=float(np.mean(times[name])),
            repeats=len(times[name]),
            batch_size=int(input_ids.shape[0]),
            tokens=int(input_ids.numel()),
        )
        for name in names
    }


def synthetic_batch(batch_size: int, length: int, vocab_size: int, *, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """A reproducible batch of ``batch_size`` rows of ``length`` tokens (no padding): ids
    drawn from the vocabulary above its first 1000 (clear of special tokens where the
    vocabulary allows), every position attended, one segment."""
    if batch_size < 1 or length < 1:
        raise GlpError(f"a batch needs at least 1 row of 1 token, got {batch_size}x{length}")
    generator = torch.Generator().manual_seed(seed)
    low = min(1000, max(0, vocab_size - 1))
    ids = torch.randint(low, vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids)}


def bench(models: Mapping[str, Any], shapes: list[tuple[int, int]], vocab_size: int, *,
          repeats: int = 20, warmup: int = 3) -> list[dict]:
    """Latency of every model at every (batch size, length), the models interleaved at
    each shape (:func:`measure_latency`).

    Returns:
        One row per model and shape: ``model``, ``batch_size``, ``length``, ``median_ms``,
        ``p90_ms``, ``repeats``.
    """
    rows = []
    for batch_size, length in shapes:
        batch = synthetic_batch(batch_size, length, vocab_size)
        for name, stats in measure_latency(models, batch, repeats=repeats,
                                           warmup=warmup).items():
            rows.append({"model": name, "batch_size": batch_size, "length": length,
                         "median_ms": round(stats.median_ms, 3),
                         "p90_ms": round(stats.p90_ms, 3), "repeats": stats.repeats})
    return rows
