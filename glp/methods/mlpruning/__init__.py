"""MLPruning (Yao et al., 2021): heads, FFN neurons, then weight blocks, with learnable Top-k.

Each prunable structure (an attention head, an FFN intermediate neuron, a weight block)
has a learnable importance score, and each group of them (a layer's heads, a layer's
neurons, a matrix's blocks) a learnable threshold ``t``: the top ``ceil(sigmoid(t) * n)``
scores survive. The binariser passes gradients straight through to the scores, and the
sum of the masked gradients to the threshold (the reference's ``TopKBinarizer``). An
adaptive regulariser pushes the remaining fraction of weights towards the target: the
squared excess, weighted by ``max(final_lambda * excess^2 / (1 - target)^2, 50)``, or 10
once the excess is tiny; zero below target. Training distils from the fine-tuned teacher
(temperature 2, 0.9 distillation + 0.1 hard labels).

Levels 1 and 2 (heads, neurons) are masked during training exactly as slicing would cut
them (a head's value rows, a neuron's FFN-output column), so the sliced model computes
what the masked one did. Level 3 zeroes blocks of the remaining matrices: it saves storage
only with a sparse format and time only with a block-sparse kernel.

Deviation from the reference (which also learns row masks of the attention-output and
FFN-output matrices): their rows are hidden dimensions on the residual path, which no
slicing can remove, so glp prunes only structures that make the model smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glp.methods import Method, ParamError, param, register_method


@dataclass(frozen=True)
class MLPruningConfig:
    """MLPruning's settings: the reference's, except where a CPU budget needs others.

    The reference trains 20 epochs with a mask learning rate of 1e-2 and thresholds
    starting at 10 (sigmoid ~1: keep everything). A CPU budget has far fewer steps, in
    which 1e-2 would barely move the thresholds, so by default (``mask_lr=None``) the
    mask learning rate is scaled to the run: ``2 * (10 - logit(target)) / steps``, and
    never below the reference's 1e-2. Whatever the thresholds reached, the final
    plan meets the budget: one common shift of every threshold (up or down) puts the
    kept fraction at the largest value not above ``density`` (see ``shift_to_target``).
    """

    density: float = param(0.5, "fraction of the encoder weights to keep (heads + neurons)")
    temperature: float = param(2.0, "distillation temperature")
    alpha_distil: float = param(0.9, "weight of the distillation loss")
    alpha_ce: float = param(0.1, "weight of the hard-label loss")
    final_lambda: float = param(20000.0, "the adaptive regulariser's final weight")
    mask_lr: float | None = param(None, "learning rate of mask scores and thresholds "
                                  "(default: scaled to the run's steps)")
    threshold_init: float = param(10.0, "initial threshold logit (10: keep everything)")
    pruning_epochs: float = param(2.0, "epochs of masked training with distillation")
    final_epochs: float = param(1.0, "epochs of the distillation fine-tune after slicing "
                                "(0: none)")
    block_size: int = param(0, "level 3: block width of block-sparse pruning, e.g. 16 or 32 "
                            "(0: off)")
    block_density: float = param(0.5, "level 3: fraction of blocks kept")
    block_epochs: float = param(1.0, "level 3: epochs of block-mask training")

    def __post_init__(self):
        for name in ("density", "block_density"):
            value = getattr(self, name)
            if not 0 < value <= 1 or not math.isfinite(value):
                raise ParamError(name, value, "a fraction in (0, 1], e.g. 0.5, 0.3 or 0.2")
        if self.block_size < 0:
            raise ParamError("block_size", self.block_size,
                             "0 (off) or a block width such as 16 or 32")
        for name in ("temperature", "pruning_epochs", "block_epochs"):
            value = getattr(self, name)
            if not value > 0 or not math.isfinite(value):
                raise ParamError(name, value, "a positive number")
        if not self.final_epochs >= 0 or not math.isfinite(self.final_epochs):
            raise ParamError("final_epochs", self.final_epochs, "0 (none) or more epochs")
        if self.mask_lr is not None and (not self.mask_lr > 0 or not math.isfinite(self.mask_lr)):
            raise ParamError("mask_lr", self.mask_lr, "a positive learning rate")


register_method(Method(
    name="mlpruning", family="width",
    summary="MLPruning (Yao et al. 2021): heads, FFN neurons, blocks; learnable Top-k "
            "thresholds, adaptive regulariser, distillation",
    params=MLPruningConfig, budget="density", needs=frozenset({"teacher", "train"}),
    run="glp.methods.mlpruning.prune:run", check="glp.methods.mlpruning.prune:check_density",
    followed_by=frozenset({"offline"})))
