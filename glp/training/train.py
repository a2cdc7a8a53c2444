"""Fine-tune and evaluate a sequence classifier: a plain, seeded torch loop.

AdamW with transformers' linear schedule (an optional warm-up from 0, then decay to 0)
and gradient-norm clipping at 1.0, as the HF Trainer; dynamic padding (see
:func:`glp.training.data.collate`), and batches grouped by length to cut padding on CPU. The
model and every batch go to one device (``resolve_device``: ``auto`` picks CUDA when
there is one), optionally under bf16/fp16 autocast on a GPU. For a fixed seed the loop
is deterministic on CPU: the same model, data and config give the same weights and
scores. A loss that stops being finite ends the fine-tune early, marked ``diverged``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from glp.core.errors import ParamError
from glp.training.config import PRECISIONS, FineTuneConfig
from glp.training.data import collate
from glp.training.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, compute_metrics

StepCallback = Callable[[int, int], None]
"""Called after every optimisation step with (steps done, total steps)."""

@dataclass(frozen=True)
class TrainStats:
    """What a fine-tune did: steps, examples seen, wall time and the last loss.

    ``diverged`` is True when a loss was not finite (NaN or inf): training stopped at
    that step, and the model must not be used (its weights may be NaN).
    """

    steps: int
    examples: int
    seconds: float
    final_loss: float
    diverged: bool = False
    device: str = "cpu"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        GlpError: an unknown spec, or a CUDA device this machine does not have.
    """
    if isinstance(spec, torch.device):
        return spec
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2] or "0"
        if not index.isdigit():
            raise ParamError("device", repr(spec), "a CUDA device as cuda or cuda:N "
                             "(N = 0, 1, ...)")
        if not torch.cuda.is_available():
            raise ParamError("device", repr(spec), (
                f"cpu: this torch build sees no CUDA device (torch {torch.__version__}); "
                "or install a CUDA build of torch (see README, GPU)"))
        if int(index) >= torch.cuda.device_count():
            raise ParamError("device", repr(spec), (
                f"cuda:0..cuda:{torch.cuda.device_count() - 1} (there are "
                f"{torch.cuda.device_count()} CUDA devices)"))
        return torch.device(f"cuda:{int(index)}")
    raise ParamError("device", repr(spec), "auto, cpu, cuda or cuda:N")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot autocast to."""
    if precision not in PRECISIONS:
        raise ParamError("precision", repr(precision), f"one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise ParamError("precision", precision, f"fp32: mixed precision is for a CUDA "
                         f"device, and the device is {device}")


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters are (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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


def _optimizer(model: torch.nn.Module, config: FineTuneConfig,
               **options) -> torch.optim.Optimizer:
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
    return torch.optim.AdamW(groups, lr=config.learning_rate, **options)


def total_steps(num_examples: int, config: FineTuneConfig) -> int:
    """Optimisation steps for a dataset size (fractional epochs round up)."""
    return max(1, math.ceil(config.epochs * math.ceil(num_examples / config.batch_size)))


MAX_BATCH_TOKENS = 4096
"""The most one forward pass of training takes, in padded tokens, a row of ``T`` tokens
counting ``T * max(1, T / 128)`` (past 128 tokens the attention's ``T x T`` terms, kept for
the backward pass, outgrow the rest). A batch over it runs as micro-batches whose gradients
add up to the batch's (its loss is a mean over its rows, so each micro-batch's loss is
weighted by its share of the rows). 32 rows of 128 tokens run whole; 32 of 512 as 16
passes of 2. Memory then follows this budget, not the input: docs/benchmarks.md."""


def batch_cost(rows: int, length: int) -> float:
    """What a padded batch counts against :data:`MAX_BATCH_TOKENS`."""
    return rows * length * max(1.0, length / 128)


def micro_batches(indices: Sequence[int], lengths: Sequence[int],
                  budget: float = MAX_BATCH_TOKENS) -> list[list[int]]:
    """``indices`` as one batch when it fits ``budget`` (:func:`batch_cost`); else by
    length into the fewest groups that each fit it (a row too long for it alone)."""
    if batch_cost(len(indices), max(lengths[i] for i in indices)) <= budget:
        return [list(indices)]
    groups: list[list[int]] = [[]]
    for i in sorted(indices, key=lengths.__getitem__):
        if groups[-1] and batch_cost(len(groups[-1]) + 1, lengths[i]) > budget:
            groups.append([])
        groups[-1].append(i)
    return groups


class Objective:
    """What a training run minimises, beyond the plain task loss (the default).

    A method that trains something besides the model's weights (mask scores, thresholds)
    or with another loss (distillation, a regulariser) subclasses this; the loop stays one.
    """

    def param_groups(self) -> list[dict]:
        """Extra optimiser groups (``{"params": [...], "lr": ...}``); not clipped."""
        return []

    def loss(self, model: torch.nn.Module, outputs, batch: dict, step: int,
             steps: int) -> torch.Tensor:
        """The loss of one batch (``outputs`` is the model's output on ``batch``)."""
        return outputs.loss

    def optimizer_options(self) -> dict:
        """Extra keyword arguments of AdamW (e.g. ``eps``, where a method's reference sets
        its own); the default is torch's."""
        return {}

    def forward_kwargs(self) -> dict:
        """Extra keyword arguments of the model's forward (e.g. ``output_hidden_states``)."""
        return {}

    def losses(self, model: torch.nn.Module, outputs, batch: dict, step: int,
               steps: int) -> tuple[torch.Tensor, ...]:
        """The batch's loss in parts, back-propagated one after the other (their gradients
        add up); :meth:`after_backward` sees the gradients after each part."""
        return (self.loss(model, outputs, batch, step, steps),)

    def after_backward(self, model: torch.nn.Module, part: int, parts: int, step: int,
                       steps: int) -> None:
        """Called after part ``part`` of ``parts`` is back-propagated, before the step."""


def fine_tune(
    model: torch.nn.Module,
    dataset,
    config: FineTuneConfig,
    *,
    seed: int,
    on_step: StepCallback | None = None,
    device: str | torch.device | None = "cpu",
    objective: Objective | None = None,
) -> TrainStats:
    """Fine-tune ``model`` in place on a tokenised dataset.

    Args:
        model: a sequence-classification model (its head decides the loss).
        dataset: a tokenised ``datasets.Dataset`` with ``input_ids``, ``attention_mask``,
            optionally ``token_type_ids``, and ``labels``.
        config: learning rate, batch size, epochs, schedule, clipping, precision.
        seed: seeds dropout and the batch order.
        on_step: progress callback, called with (steps done, total steps).
        device: where the model and batches go (see :func:`resolve_device`); the model
            stays there afterwards.
        objective: the loss and extra trainable parameters (default: the task loss).

    Returns:
        The number of steps and examples, the wall time, the last batch's loss, the
        device, and whether the loss diverged (then training stopped at that step).
    """
    from transformers import get_linear_schedule_with_warmup

    if len(dataset) == 0:
        raise ValueError("cannot fine-tune on an empty dataset")
    target = resolve_device(device)
    check_precision(config.precision, target)
    torch.manual_seed(seed)
    model.to(target)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    steps = total_steps(len(lengths), config)
    objective = objective or Objective()
    optimizer = _optimizer(model, config, **objective.optimizer_options())
    for group in objective.param_groups():
        optimizer.add_param_group({"weight_decay": 0.0, **group})
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
    # Loss scaling for fp16 only; disabled, the scaler passes everything straight through.
    scaler = torch.amp.GradScaler(target.type, enabled=config.precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    start, seen, loss_value, diverged = time.perf_counter(), 0, float("nan"), False
    batches = _batches_forever(lengths, config, seed)
    # An objective that reads the gradients after each part sees a whole batch's.
    splits = type(objective).after_backward is Objective.after_backward
    for step in range(steps):
        indices = next(batches)
        loss_value = 0.0
        for chunk in micro_batches(indices, lengths, MAX_BATCH_TOKENS) if splits else [indices]:
            share = len(chunk) / len(indices)
            batch = collate(dataset, chunk, pad_id, device=target)
            with _autocast(config.precision, target):
                outputs = model(**batch, **objective.forward_kwargs())
                parts = objective.losses(model, outputs, batch, step, steps)
            loss_value += share * float(sum(part.detach() for part in parts))
            if not math.isfinite(loss_value):
                break
            for number, part in enumerate(parts):
                scaler.scale(part * share if share < 1 else part).backward(
                    retain_graph=number + 1 < len(parts))
                objective.after_backward(model, number, len(parts), step, steps)
            del batch, outputs, parts
        if not math.isfinite(loss_value):
            diverged = True  # NaN/inf: every later step would only spread it
            break
        scaler.unscale_(optimizer)  # clip the true gradients
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(indices)
        if on_step is not None:
            on_step(step + 1, steps)
    model.eval()
    done = step + (0 if diverged else 1)
    return TrainStats(done, seen, time.perf_counter() - start, loss_value, diverged,
                      str(target))


@torch.inference_mode()
def predict(model: torch.nn.Module, dataset, *, batch_size: int = 128,
            device: str | torch.device | None = None,
            max_tokens: int = 4 * MAX_BATCH_TOKENS) -> np.ndarray:
    """Logits (or regression scores) for every row, in the dataset's order.

    Rows go by length, at most ``batch_size`` per pass and fewer where they are long, so
    that no pass holds more than ``max_tokens`` padded tokens (inference keeps no
    activations for a backward pass, hence a larger budget than training's).
    ``device`` moves the model there first; None keeps it where it is.
    """
    if device is not None:
        model.to(resolve_device(device))
    target = model_device(model)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    # Sorting by length makes batches tight; the output is put back in input order.
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    model.eval()
    outputs = np.zeros((len(order), model.config.num_labels), dtype=np.float32)
    start = 0
    while start < len(order):
        # sorted ascending: the last row of a slice is its longest
        size = min(batch_size, len(order) - start)
        while size > 1 and size * lengths[order[start + size - 1]] > max_tokens:
            size -= 1
        indices = order[start : start + size]
        start += size
        batch = collate(dataset, indices, pad_id, device=target)
        batch.pop("labels", None)
        outputs[indices] = model(**batch).logits.float().cpu().numpy()
    return outputs


def evaluate(
    model: torch.nn.Module, dataset, *, is_regression: bool, batch_size: int = 128,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Every metric of the task family (accuracy/F1/MCC or Pearson/Spearman) on ``dataset``.

    A model whose outputs are not all finite (a diverged one) gets NaN for every metric,
    never a number that looks like a score: NaN never wins a selection.
    """
    logits = predict(model, dataset, batch_size=batch_size, device=device)
    if not np.isfinite(logits).all():
        names = REGRESSION_METRICS if is_regression else CLASSIFICATION_METRICS
        return dict.fromkeys((*names, "loss"), float("nan"))
    labels = np.asarray(dataset["labels"])
    return {**compute_metrics(logits, labels, is_regression=is_regression),
            "loss": eval_loss(logits, labels, is_regression=is_regression)}


def eval_loss(logits: np.ndarray, labels: np.ndarray, *, is_regression: bool) -> float:
    """The training loss on evaluation rows: mean cross-entropy, or the mean squared error
    for regression. It still orders models that all predict the majority class (a tie in
    every metric), as short fine-tunes often do."""
    if is_regression:
        return float(np.mean((logits.reshape(-1).astype(np.float64) - labels) ** 2))
    scores = logits.astype(np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels.astype(np.int64)].mean())
