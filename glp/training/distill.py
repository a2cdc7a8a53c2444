"""Knowledge distillation from a fine-tuned teacher: the loss, and a whole distilled fine-tune.

The loss is 0.9 x the KL divergence to the teacher's soft targets at temperature T (times
T^2), + 0.1 x the task loss (MLPruning's objective, which DistilBERT's task distillation
also uses); for regression, the mean squared error to the teacher's scores.
"""

from __future__ import annotations

import torch
from torch import nn

from glp.training.config import FineTuneConfig
from glp.training.train import Objective, StepCallback, TrainStats, fine_tune, resolve_device


def freeze(teacher: nn.Module, device: str) -> nn.Module:
    """The teacher in evaluation mode on ``device``, with no gradients."""
    teacher.eval().to(resolve_device(device))
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


class Distillation(Objective):
    """``alpha_distil`` x distillation + ``alpha_ce`` x the task loss (the task loss alone
    without a teacher)."""

    def __init__(self, teacher: nn.Module | None, temperature: float = 2.0,
                 alpha_distil: float = 0.9, alpha_ce: float = 0.1):
        self.teacher, self.temperature = teacher, temperature
        self.alpha_distil, self.alpha_ce = alpha_distil, alpha_ce

    def loss(self, model, outputs, batch, step, steps):
        loss = outputs.loss
        if self.teacher is not None:
            with torch.no_grad():
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                teacher_logits = self.teacher(**inputs).logits
            if outputs.logits.shape[-1] == 1:  # regression: match the teacher's scores
                distil = nn.functional.mse_loss(outputs.logits, teacher_logits)
            else:
                t = self.temperature
                distil = nn.functional.kl_div(
                    nn.functional.log_softmax(outputs.logits / t, dim=-1),
                    nn.functional.softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean") * t**2
            loss = self.alpha_distil * distil + self.alpha_ce * loss
        return loss


def distil_layers(model: nn.Module, teacher: nn.Module, dataset, finetune: FineTuneConfig,
                  *, seed: int, temperature: float = 2.0, device: str = "cpu",
                  on_step: StepCallback | None = None) -> TrainStats:
    """A layer-pruned model's whole fine-tune with knowledge distillation from ``teacher``
    (the unpruned fine-tuned model): ``finetune`` as for any final model."""
    freeze(teacher, device)
    return fine_tune(model, dataset, finetune, seed=seed, device=device,
                     objective=Distillation(teacher, temperature), on_step=on_step)
