"""GRAIN (Yang et al., ACL 2023): gradient-based intra-attention pruning with distillation.

The structures are each head's query/key dimensions, each head's value/output dimensions
and the FFN intermediate neurons. One training run does everything, as the reference
(airaria/GRAIN, ``FineISPruner``) does. The reference's student starts from the
*pre-trained* model (with a new task head) and learns the task from the fine-tuned teacher
alone; glp's ``init`` chooses that (``pretrained``) or a copy of the fine-tuned teacher
(``teacher``, the default: it works for a model given already fine-tuned, whose pre-trained
model is unknown, and it starts from the task's accuracy, which a short CPU run needs):

- **Importance**: a first-order Taylor estimate per structure, ``|sum(weight x grad)|``
  over the structure's matrix (the query row and bias for a query/key dimension, the
  attention output column for a value/output dimension, the FFN output column for a
  neuron), smoothed by an exponential moving average (beta 0.998).
- **Gradient separation**: the scores are gathered after the prediction (logit
  distillation) loss alone is back-propagated; the hidden-state matching loss is
  back-propagated afterwards and never enters them.
- **Head-structure regulariser**: a value/output dimension's score update is multiplied
  by ``tanh(kept fraction of its head / 0.3)``, so that dimensions of a head that is
  mostly gone lose importance and whole heads empty out (``IS_alpha_head``); the
  same with ``1e-4`` per layer (attention and FFN) only guards the last ones.
- **Schedule**: the kept fraction falls from 1 to the target on a cubic curve between
  20% and 40% of the steps, with a pruning step at every optimisation step (pruned
  structures stay pruned); the remaining steps train the pruned (masked) model.
  Pruning is global: one ranking across layers and structure kinds, each structure
  weighted by the parameters it carries.
- **Distillation**: cross-entropy against the teacher's soft labels at temperature 8 (KD
  weight 1, hard-label weight 0), plus the mean squared error between student and
  teacher hidden states of layers 0, 2, 4, ... through learnable linear maps that start
  as the identity (discarded afterwards).
- **Optimiser**: AdamW with the reference's eps 1e-6 and weight decay 0.01 (not on biases
  and LayerNorm weights), a linear warm-up over the first 10% of the steps, then linear
  decay to 0; gradient-norm clipping at 1.0.
- **Embeddings**: optionally factorised by truncated SVD before training (the reference
  uses 192 dimensions); the factors train with the rest.

At the end the masks become a plan (:class:`glp.core.plan.Plan` ``qk``/``vo``/``neurons``)
and the model is sliced to it; :mod:`glp.core.attention` runs its uneven heads.

Deviations (also in :data:`SETTINGS`): every remaining layer keeps at least one
value/output dimension and one FFN neuron (the reference can empty a sublayer and bypass
it; a glp plan cannot express an empty sublayer, whose removal would need a new kind of
plan entry and surgery), and the last pruning step reaches the target exactly (the
reference stops one step before the end of the window).
"""

from __future__ import annotations

from dataclasses import dataclass

from glp.methods import Method, ParamError, Setting, check_number, param, register_method

INITS = ("teacher", "pretrained")
"""Where the student starts: a copy of the fine-tuned teacher, or the pre-trained model."""


@dataclass(frozen=True)
class GrainConfig:
    """GRAIN's settings, defaulting to the reference's (scripts/run_glue.sh)."""

    # The fraction of the encoder layers' weights kept, as MLPruning's density (the
    # reference's end_weights_ratio counts the prunable matrices only; glp converts, see
    # DimMasks.prunable_target, so LayerNorms and output biases count as kept).
    density: float = param(0.05, "fraction of the encoder weights to keep")
    epochs: float = param(20.0, "epochs of the whole run: the pruning window and training "
                          "after it", option="pruning_epochs")
    start: float = param(0.2, "pruning starts at this fraction of the steps",
                         option="grain_start")
    end: float = param(0.4, "the density is reached at this fraction of the steps (cubic "
                       "schedule); the rest trains the pruned model", option="grain_end")
    beta: float = param(0.998, "moving average of the importance scores", option="ema")
    head_alpha: float = param(0.3, "head-structure regulariser: a head's value/output scores "
                              "are damped by tanh(kept fraction / this); larger empties whole "
                              "heads sooner", option="head_regulariser")
    alpha: float = param(1e-4, "the same per layer, for attention and FFN (IS_alpha)",
                         option="layer_regulariser")
    temperature: float = param(8.0, "distillation temperature")
    kd_weight: float = param(1.0, "weight of the logit distillation loss")
    hard_weight: float = param(0.0, "weight of the hard-label loss")
    hidden_weight: float = param(1.0, "weight of the hidden-state MSE, layers 0, 2, 4, ... "
                                 "(0: off)")
    embedding_rank: int = param(192, "SVD rank of the word embeddings (0: off; skipped where "
                                "it saves nothing)")
    gradient_separation: bool = param(True, "importance scores from the prediction loss "
                                      "only (the reference's gradient separation)")
    init: str = param("teacher", "the student starts from the fine-tuned teacher (teacher) "
                      "or from the pre-trained model it was fine-tuned from, with a new task "
                      "head (pretrained, the reference's)", option="init")
    warmup: float = param(0.1, "fraction of the steps of linear learning-rate warm-up",
                          option="grain_warmup")
    weight_decay: float = param(0.01, "AdamW weight decay (not on biases and LayerNorm "
                                "weights)", option="grain_weight_decay")
    adam_epsilon: float = param(1e-6, "AdamW's eps", option="grain_adam_epsilon")

    def __post_init__(self):
        checks = [
            ("density", 0 < self.density <= 1, "a fraction in (0, 1], e.g. 0.2, 0.1 or 0.05"),
            ("epochs", self.epochs > 0, "a positive number of epochs"),
            ("start", 0 <= self.start < 1, "a fraction of the steps in [0, 1)"),
            ("end", self.start <= self.end <= 1,
             f"a fraction from the pruning start ({self.start:g}) to 1"),
            ("beta", 0 <= self.beta < 1, "in [0, 1), e.g. 0.998"),
            ("head_alpha", self.head_alpha > 0, "a positive number, e.g. 0.3"),
            ("alpha", self.alpha > 0, "a positive number, e.g. 1e-4"),
            ("temperature", self.temperature > 0, "a positive temperature, e.g. 8"),
            ("kd_weight", self.kd_weight >= 0, "a weight >= 0"),
            ("hard_weight", self.hard_weight >= 0, "a weight >= 0"),
            ("hidden_weight", self.hidden_weight >= 0, "a weight >= 0"),
            ("embedding_rank", self.embedding_rank >= 0, "0 (off) or a rank such as 192"),
            ("warmup", 0 <= self.warmup < 1, "a fraction of the steps in [0, 1), e.g. 0.1"),
            ("weight_decay", self.weight_decay >= 0, "a weight decay >= 0, e.g. 0.01"),
            ("adam_epsilon", self.adam_epsilon > 0, "a positive eps, e.g. 1e-6"),
        ]
        for name, ok, valid in checks:
            check_number(name, getattr(self, name), ok, valid)
        if self.init not in INITS:
            raise ParamError("init", repr(self.init), f"one of {', '.join(INITS)}")
        if self.kd_weight == 0 and self.hard_weight == 0:
            raise ParamError("kd_weight", 0, "a weight above 0 when the hard-label weight is "
                             "0 (the prediction loss would be zero and give no importance "
                             "scores)")


SETTINGS = (
    Setting("student's starting point", "pretrained", param="init",
            why="the teacher works for every input, also a model given already fine-tuned "
                "(whose pre-trained model is unknown, so pretrained is refused), and it "
                "starts at the task's accuracy, which the few epochs a CPU run affords "
                "need; --init pretrained is the reference's"),
    Setting("target encoder density", "end_weights_ratio (e.g. 0.05) of the prunable "
            "matrices", param="density",
            why="glp's density counts every encoder weight (LayerNorms and output biases "
                "as kept), as MLPruning's; converted to the prunable fraction"),
    Setting("epochs", "20", param="epochs"),
    Setting("learning rate", "3e-5", fixed="--lr (2e-5)",
            why="one learning rate per job, shared with the teacher's fine-tune"),
    Setting("batch size (--batch-size)", "32", fixed="32"),
    Setting("max sequence length (--max-length)", "128", fixed="128"),
    Setting("learning-rate warm-up", "0.1", param="warmup"),
    Setting("weight decay", "0.01", param="weight_decay"),
    Setting("AdamW eps", "1e-06", param="adam_epsilon"),
    Setting("gradient-norm clipping (--max-grad-norm)", "1.0", fixed="1.0"),
    Setting("precision", "fp16", fixed="--precision (fp32)",
            why="fp16 needs a GPU; the same option turns it on there"),
    Setting("seed", "1337", fixed="--seeds (40, 41, ...)",
            why="glp's seeds are the paper's final seeds, one per model"),
    Setting("pruning start", "0.2", param="start"),
    Setting("pruning end", "0.4", param="end"),
    Setting("pruning frequency", "every step", fixed="every step"),
    Setting("last pruning step", "one step before the end of the window",
            fixed="the end of the window, at the target exactly",
            why="the model meets the density it was asked for"),
    Setting("importance EMA", "0.998", param="beta"),
    Setting("head regulariser (IS_alpha_head)", "0.3", param="head_alpha"),
    Setting("layer regulariser (IS_alpha)", "0.0001", param="alpha"),
    Setting("distillation temperature", "8", param="temperature"),
    Setting("KD weight", "1", param="kd_weight"),
    Setting("hard-label weight", "0", param="hard_weight"),
    Setting("hidden-state MSE weight (layers 0, 2, ..., 12)", "1", param="hidden_weight"),
    Setting("word-embedding SVD rank", "192", param="embedding_rank"),
    Setting("gradient separation", "True", param="gradient_separation"),
    Setting("empty sublayer (all value/output dimensions or all FFN neurons of a layer)",
            "allowed, the sublayer is bypassed", fixed="at least one of each per layer",
            why="a glp plan cannot express an empty sublayer (it would need a new plan "
                "entry and surgery); remove the whole layer by layer pruning instead"),
)
"""GRAIN's settings beside the reference's (scripts/run_glue.sh, glue/main.py,
glue/config_prunedistiller.py)."""


register_method(Method(
    name="grain", family="width",
    summary="GRAIN (Yang et al. 2023): query/key and value/output dimensions of each head, "
            "FFN neurons; Taylor importance, cubic schedule, distillation with gradient "
            "separation",
    params=GrainConfig, budget="density",
    needs=frozenset({"teacher", "pretrained", "train"}),
    run="glp.methods.grain.prune:run", check="glp.methods.grain.prune:check_density",
    first_only=True,
    reference="Yang, Cui, Chen, Wang, \"Gradient-based Intra-attention Pruning on Pre-trained "
              "Language Models\", ACL 2023; code airaria/GRAIN (scripts/run_glue.sh, "
              "scripts/glue/main.py, scripts/pruners_and_distiller/)",
    settings=SETTINGS))
