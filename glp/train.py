"""Fine-tune and evaluate a sequence classifier: a plain, seeded torch loop.

AdamW with linear decay (optional warm-up), dynamic padding, and batches grouped by
length to cut padding on CPU. For a fixed seed the loop is deterministic on CPU:
the same model, data and config give the same weights and scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from glp.config import FineTuneConfig
from glp.metrics import compute_metrics

StepCallback = Callable[[int, int], None]
"""Called after every optimisation step with (steps done, total steps)."""

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class TrainStats:
    """What a fine-tune did: steps, examples seen, wall time and the last loss."""

    steps: int
    examples: int
    seconds: float
    final_loss: float


def _columns(dataset) -> dict[str, list]:
    """The tokenised columns as plain lists (one conversion, then cheap indexing)."""
    names = [c for c in (*_MODEL_INPUTS, "labels") if c in dataset.column_names]
    return {name: dataset[name] for name in names}


def _collate(columns: dict[str, list], indices: Sequence[int], pad_id: int) -> dict:
    """Pad a batch to its longest member (dynamic padding)."""
    width = max(len(columns["input_ids"][i]) for i in indices)
    batch = {}
    for name in _MODEL_INPUTS:
        if name not in columns:
            continue
        fill = pad_id if name == "input_ids" else 0
        rows = [columns[name][i] + [fill] * (width - len(columns[name][i])) for i in indices]
        batch[name] = torch.tensor(rows, dtype=torch.long)
    if "labels" in columns:
        labels = [columns["labels"][i] for i in indices]
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long
        batch["labels"] = torch.tensor(labels, dtype=dtype)
    return batch


def _epoch_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator, group_by_length: bool
) -> list[list[int]]:
    """One epoch of shuffled batches; with grouping, similar lengths share a batch."""
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    # Sort within chunks of 50 batches: most of the padding saving, most of the randomness.
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk].tolist(), key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _batches_forever(
    lengths: Sequence[int], config: FineTuneConfig, seed: int
) -> Iterator[list[int]]:
    rng = np.random.default_rng(seed)
    while True:
        yield from _epoch_batches(lengths, config.batch_size, rng, config.length_grouping)


def _optimizer(model: torch.nn.Module, config: FineTuneConfig) -> torch.optim.Optimizer:
    # The usual BERT recipe: no weight decay on biases and LayerNorm weights.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm_or_bias = name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
        (no_decay if is_norm_or_bias else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps(num_examples: int, config: FineTuneConfig) -> int:
    """Optimisation steps for a dataset size (fractional epochs round up)."""
    return max(1, math.ceil(config.epochs * math.ceil(num_examples / config.batch_size)))


def fine_tune(
    model: torch.nn.Module,
    dataset,
    config: FineTuneConfig,
    *,
    seed: int,
    on_step: StepCallback | None = None,
) -> TrainStats:
    """Fine-tune ``model`` in place on a tokenised dataset.

    Args:
        model: a sequence-classification model (its head decides the loss).
        dataset: a tokenised ``datasets.Dataset`` with ``input_ids``, ``attention_mask``,
            optionally ``token_type_ids``, and ``labels``.
        config: learning rate, batch size, epochs, schedule.
        seed: seeds dropout and the batch order.
        on_step: progress callback, called with (steps done, total steps).

    Returns:
        The number of steps and examples, the wall time and the last batch's loss.
    """
    if len(dataset) == 0:
        raise ValueError("cannot fine-tune on an empty dataset")
    torch.manual_seed(seed)
    columns = _columns(dataset)
    lengths = [len(ids) for ids in columns["input_ids"]]
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    steps = total_steps(len(lengths), config)
    optimizer = _optimizer(model, config)
    scheduler = _linear_schedule(optimizer, int(config.warmup_ratio * steps), steps)
    model.train()
    start, seen, loss_value = time.perf_counter(), 0, float("nan")
    batches = _batches_forever(lengths, config, seed)
    for step in range(steps):
        indices = next(batches)
        outputs = model(**_collate(columns, indices, pad_id))
        outputs.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(indices)
        loss_value = float(outputs.loss.detach())
        if on_step is not None:
            on_step(step + 1, steps)
    model.eval()
    return TrainStats(steps, seen, time.perf_counter() - start, loss_value)


@torch.inference_mode()
def predict(model: torch.nn.Module, dataset, *, batch_size: int = 128) -> np.ndarray:
    """Logits (or regression scores) for every row, in the dataset's order."""
    columns = _columns(dataset)
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    # Sorting by length makes batches tight; the output is put back in input order.
    order = sorted(range(len(columns["input_ids"])), key=lambda i: len(columns["input_ids"][i]))
    model.eval()
    outputs = np.zeros((len(order), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = _collate(columns, indices, pad_id)
        batch.pop("labels", None)
        outputs[indices] = model(**batch).logits.float().numpy()
    return outputs


def evaluate(
    model: torch.nn.Module, dataset, *, is_regression: bool, batch_size: int = 128
) -> dict[str, float]:
    """Every metric of the task family (accuracy/F1/MCC or Pearson/Spearman) on ``dataset``."""
    logits = predict(model, dataset, batch_size=batch_size)
    return compute_metrics(logits, np.asarray(dataset["labels"]), is_regression=is_regression)
