"""MLPruning (Yao et al., 2021): heads, FFN neurons, then weight blocks, with learnable Top-k.

Each prunable structure (an attention head, an FFN intermediate neuron, a weight block)
has a learnable importance score, and each group of them (a layer's heads, a layer's
neurons, a matrix's blocks) a learnable threshold ``t``: the top ``ceil(sigmoid(t) * n)``
scores survive. The binariser passes gradients straight through to the scores, and the
sum of the masked gradients to the threshold (the reference's ``TopKBinarizer``). An
adaptive regulariser pushes the remaining fraction of weights towards the target: the
squared excess, weighted by ``max(final_lambda * excess^2 / (1 - target)^2, 50)``, or 10
once the excess is tiny; zero below target. Training distils from the fine-tuned teacher
as the reference does: 0.9 x (the logits' KL divergence at temperature 2 + the hidden
states' MSE, embeddings and every layer + the attention probabilities' MSE, every layer)
+ 0.1 x the task loss.

The student is a copy of the fine-tuned teacher (``init="teacher"``, the default) or, as
in the reference, the pre-trained model the teacher was fine-tuned from, with a new task
head (``init="pretrained"``; refused for a model given already fine-tuned, whose
pre-trained model is unknown).

Levels 1 and 2 (heads, neurons) are masked during training as the reference masks them:
one score per head masks its rows of the query, key and value projections (weights and
biases), one score per neuron its row of the FFN-input matrix, before the activation.
That is exactly what slicing cuts, so the sliced model computes what the masked one did.
Level 3 zeroes blocks of the remaining matrices: it saves storage
only with a sparse format and time only with a block-sparse kernel.

Deviations from the reference are listed, with their reasons, in :data:`SETTINGS` (and
docs/methods.md's table). The largest: the reference also learns row masks of the
attention-output and FFN-output matrices and slices those rows, adding each sliced
projection's output into the residual stream at the kept hidden indices; glp's plans and
surgery have no such entry, so it keeps those matrices whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glp.methods import Method, ParamError, Setting, param, register_method

INITS = ("teacher", "pretrained")
"""Where the student starts: a copy of the fine-tuned teacher, or the pre-trained model."""


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
    init: str = param("teacher", "the student starts from the fine-tuned teacher (teacher) "
                      "or from the pre-trained model it was fine-tuned from, with a new task "
                      "head (pretrained, the reference's)", option="init")
    hidden_weight: float = param(1.0, "weight of the hidden-state MSE (embeddings and every "
                                 "layer), inside the distillation loss (0: off)")
    attention_weight: float = param(1.0, "weight of the attention-probability MSE (every "
                                    "layer), inside the distillation loss (0: off)")

    def __post_init__(self):
        for name in ("density", "block_density"):
            value = getattr(self, name)
            if not 0 < value <= 1 or not math.isfinite(value):
                raise ParamError(name, value, "a fraction in (0, 1], e.g. 0.5, 0.3 or 0.2")
        if self.block_size < 0:
            raise ParamError("block_size", self.block_size,
                             "0 (off) or a block width such as 16 or 32")
        if self.init not in INITS:
            raise ParamError("init", repr(self.init), f"one of {', '.join(INITS)}")
        for name in ("hidden_weight", "attention_weight"):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise ParamError(name, value, "a weight >= 0 (0: off), e.g. 1")
        for name in ("temperature", "pruning_epochs", "block_epochs"):
            value = getattr(self, name)
            if not value > 0 or not math.isfinite(value):
                raise ParamError(name, value, "a positive number")
        if not self.final_epochs >= 0 or not math.isfinite(self.final_epochs):
            raise ParamError("final_epochs", self.final_epochs, "0 (none) or more epochs")
        if self.mask_lr is not None and (not self.mask_lr > 0 or not math.isfinite(self.mask_lr)):
            raise ParamError("mask_lr", self.mask_lr, "a positive learning rate")


SETTINGS = (
    Setting("student's starting point (heads, rows)", "the pre-trained model "
            "(bert-base-uncased), taught by the fine-tuned one", param="init",
            why="the teacher works for every input, also a model given already fine-tuned "
                "(whose pre-trained model is unknown, so pretrained is refused), and it "
                "starts at the task's accuracy, which the few epochs a CPU run affords "
                "need; --init pretrained is the reference's"),
    Setting("target encoder density", "final_threshold (e.g. 0.5), counted with BERT-base's "
            "matrix shapes (masked_run_glue.py's remain_param_compute)", param="density",
            why="glp counts the model's own encoder-layer weights (biases included, "
                "LayerNorms as kept), so any size and family is sized correctly"),
    Setting("epochs of mask training (heads, rows)", "20", param="pruning_epochs",
            why="a CPU budget; pass --pruning-epochs 20 for the reference's"),
    Setting("learning rate", "3e-5", fixed="--lr (2e-5)",
            why="one learning rate per job, shared with the teacher's fine-tune"),
    Setting("mask-score learning rate", "0.01", param="mask_lr",
            why="None scales it to the run, 2 * (10 - logit(density)) / steps, never below "
                "0.01: in a few CPU epochs 0.01 would barely move the thresholds; "
                "--mask-lr 0.01 is the reference's"),
    Setting("batch size (--batch-size)", "32", fixed="32"),
    Setting("max sequence length (--max-length)", "128", fixed="128"),
    Setting("learning-rate warm-up", "11000 steps (about 1 of QQP's 20 epochs)",
            fixed="none (linear decay from the start)",
            why="glp's fine-tunes share one schedule without warm-up (the greedy-pruning "
                "paper's); the thresholds start at 10 and move slowly anyway"),
    Setting("weight decay", "0", fixed="0"),
    Setting("AdamW eps", "1e-08", fixed="1e-08"),
    Setting("gradient-norm clipping", "1.0 (mask scores included)",
            fixed="--max-grad-norm (1.0), model weights only",
            why="the mask scores and thresholds are an extra optimiser group, which glp's "
                "loop does not clip"),
    Setting("precision", "fp16", fixed="--precision (fp32)",
            why="fp16 needs a GPU; the same option turns it on there"),
    Setting("seed", "42", fixed="--seeds (40, 41, ...)",
            why="glp trains several seeds and registers the best on the selection split"),
    Setting("distillation temperature", "2", param="temperature"),
    Setting("distillation weight (alpha_distil)", "0.9", param="alpha_distil"),
    Setting("hard-label weight (alpha_ce)", "0.1", param="alpha_ce"),
    Setting("regulariser's final lambda", "20000", param="final_lambda"),
    Setting("regulariser", "squared excess of the kept fraction over the target, weight "
            "max(lambda * excess^2 / (1 - target)^2, 50), 10 below 3e-4, 0 below target",
            fixed="squared excess of the kept fraction over the target, weight "
            "max(lambda * excess^2 / (1 - target)^2, 50), 10 below 3e-4, 0 below target"),
    Setting("initial threshold logit", "10", param="threshold_init"),
    Setting("mask-score init", "constant 0", fixed="0 plus a descending ramp of at most 1e-6",
            why="equal scores tie; the ramp breaks the ties by index, the same on every "
                "run and device"),
    Setting("head masks", "one score per head, shared by the query, key and value "
            "projections (weights and biases)", fixed="one score per head, shared by the "
            "query, key and value projections (weights and biases)"),
    Setting("FFN neuron masks", "rows (and biases) of the FFN-input matrix, before GELU",
            fixed="rows (and biases) of the FFN-input matrix, before GELU"),
    Setting("row masks of the attention-output and FFN-output matrices", "learned "
            "(one threshold per matrix); the rows are sliced and the result added to the "
            "residual stream at the kept hidden indices", fixed="none: the matrices stay whole",
            why="glp's plans and surgery have no entry for a projection that writes a "
                "subset of the residual dimensions; the budget is met by heads and neurons "
                "only"),
    Setting("slicing", "after training, at the learned thresholds",
            fixed="after training, at the learned thresholds shifted by one common amount",
            why="the shift makes the plan meet --density exactly whatever a short run "
                "reached"),
    Setting("distillation fine-tune after slicing (epochs)", "0 (none)",
            param="final_epochs",
            why="the shift that meets the budget changes the masked model; a short "
                "distillation recovers it (0 turns it off)"),
    Setting("hidden-state MSE (embeddings and every layer), inside the distillation loss",
            "1", param="hidden_weight"),
    Setting("attention-probability MSE (every layer), inside the distillation loss", "1",
            param="attention_weight"),
    Setting("attention MSE of a sliced model (the fine-tune after slicing, level 3)",
            "the head-pruned teacher's attention (level 3)",
            fixed="the unpruned teacher's attention of the kept heads",
            why="glp's teacher is the unpruned model in every phase"),
    Setting("level 3 block size", "16x16 or 32x32, a second run", param="block_size",
            why="off by default: zeroed blocks save time only with a block-sparse kernel"),
    Setting("level 3 epochs", "20", param="block_epochs", why="a CPU budget"),
    Setting("level 3 block-score init", "constant 0", fixed="each block's mean absolute "
            "weight, scaled to at most 1",
            why="a short CPU run cannot learn an order from equal scores as 20 epochs can"),
    Setting("level 3 student and teacher", "the head/row-pruned model is both",
            fixed="the sliced model, taught by the unpruned fine-tuned model",
            why="one teacher for every phase of a run; the unpruned one is the stronger"),
)
"""MLPruning's settings beside the reference's (training/README.md's commands,
training/masked_run_glue.py, training/emmental/)."""


register_method(Method(
    name="mlpruning", family="width",
    summary="MLPruning (Yao et al. 2021): heads, FFN neurons, blocks; learnable Top-k "
            "thresholds, adaptive regulariser, distillation",
    params=MLPruningConfig, budget="density",
    needs=frozenset({"teacher", "pretrained", "train"}),
    run="glp.methods.mlpruning.prune:run", check="glp.methods.mlpruning.prune:check_density",
    followed_by=frozenset({"offline"}),
    reference="Yao, Ma, Shen, Keutzer, Mahoney, \"MLPruning: A Multilevel Structured Pruning "
              "Framework for Transformer-based Models\", 2021; code yaozhewei/MLPruning "
              "(training/masked_run_glue.py, training/masked_blockwise_run_glue.py, "
              "training/emmental/)",
    settings=SETTINGS))
