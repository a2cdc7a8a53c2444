"""Post-training pruning without retraining (Kwon et al., NeurIPS 2022).

"A Fast Post-Training Pruning Framework for Transformers"; reference code
WoosukKwon/retraining-free-pruning (``main.py``, ``prune/``). Given a fine-tuned model, a
budget of multiply-accumulates (MACs) and a sample of training rows, it prunes attention
heads and FFN neurons with no gradient step on any weight:

1. **Mask search** (``prune/search.py``, ``search_mac``): every head and neuron has a mask
   variable, 1 at first; the gradients of the task loss with respect to the masks, one per
   batch of the sample, give the diagonal Fisher information (their squares summed). Heads
   and neurons are ranked globally by it, and of every split of the MAC budget between
   heads and neurons the one that keeps the most Fisher information wins.
2. **Mask rearrangement** (``prune/rearrange.py``): within each layer, the kept set is
   improved greedily with the block-diagonal Fisher (the gradients' inner products, which
   see how removing two structures together costs more or less than apart).
3. **Mask tuning** (``prune/rescale.py``): layer by layer, the kept masks become real
   numbers, by linear least squares, so that each sublayer's output (before its
   LayerNorm) reconstructs that of a less-pruned teacher mask on the sample: the mask
   searched at ``sqrt(constraint)``, the reference's two-step schedule. The model's own
   weights stay as they are; the masks are then folded into the attention-output and
   FFN-output matrices and the pruned heads and neurons are sliced away (a plan).

A budget is a fraction of the encoder's MACs at the sample's mean sequence length: a head
costs ``4 * s * d * h + 2 * s^2 * h`` (its query, key, value and output, and its attention
scores), a neuron ``2 * s * d`` (``efficiency/mac.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from glp.methods import Method, Setting, check_number, param, register_method


@dataclass(frozen=True)
class PostTrainingParams:
    """The post-training pruning's settings, defaulting to the reference's (main.py)."""

    constraint: float = param(0.6, "fraction of the encoder's multiply-accumulates to keep, "
                              "at the sample's mean sequence length")
    samples: int = param(2048, "training rows sampled for the Fisher information and the "
                         "least squares (at most the split's rows)")
    rearrange: bool = param(True, "rearrange each layer's masks with the block-diagonal "
                            "Fisher information")
    rescale: bool = param(True, "tune the kept masks layer by layer by least squares "
                          "against a less-pruned teacher mask")

    def __post_init__(self):
        check_number("constraint", self.constraint, 0 < self.constraint <= 1,
                     "a fraction in (0, 1], e.g. 0.6 (keep 60% of the MACs)")
        check_number("samples", self.samples, self.samples >= 1, "at least 1 row, e.g. 2048")


SETTINGS = (
    Setting("budget metric", "MACs (or a latency lookup table on a GPU)",
            fixed="MACs",
            why="a latency table is measured per GPU model; glp's speed-ups are measured "
                "after pruning instead"),
    Setting("MAC constraint", "required (e.g. 0.6)", param="constraint",
            why="glp needs a default; 0.6 is the paper's 40% cut"),
    Setting("sampled training rows", "2048", param="samples"),
    Setting("sampling", "with replacement", fixed="without replacement, at most the "
            "split's rows",
            why="a small training split would be sampled many times over for nothing"),
    Setting("sequence length of the MAC count", "the task's mean dev length (a table)",
            fixed="the sample's mean length",
            why="works for any dataset, not only the GLUE tasks in the table"),
    Setting("batch size of the sample (glp's --batch-size)", "32", fixed="32"),
    Setting("heads and neurons per layer", "may be 0", fixed="at least 1 each",
            why="a glp plan keeps at least one head and one neuron in a remaining layer "
                "(remove the layer instead)"),
    Setting("mask rearrangement", "True", param="rearrange"),
    Setting("mask tuning (least squares)", "True", param="rescale"),
    Setting("teacher mask of the tuning", "searched at sqrt(constraint) (2-step schedule)",
            fixed="searched at sqrt(constraint) (2-step schedule)"),
    Setting("teacher's FFN output in the tuned layer",
            "every neuron of that layer (its capture hook runs before the teacher's "
            "neuron mask)", fixed="the teacher mask's neurons",
            why="the paper's teacher is the less-pruned mask; the reference's input hook, "
                "registered before the mask's, sees the FFN input unmasked"),
    Setting("first layer's attention", "not tuned", fixed="not tuned"),
    Setting("last layer's FFN (every GLUE task, STS-B's regression too)",
            "[CLS] token only", fixed="[CLS] token only"),
    Setting("tuning stops", "at a failed solve or a scale beyond ±10 (a layer's tuned "
            "attention kept)", fixed="at a failed solve or a scale beyond ±10 (a layer's "
            "tuned attention kept)"),
    Setting("least-squares solver", "LSMR on the normal equations, damping 1 around the "
            "all-ones mask, at most n iterations (CuPy, GPU)",
            fixed="their exact minimiser (torch.linalg.lstsq, gelsd, CPU)",
            why="the damping is absolute: on a tiny random BERT it held every scale within "
                "0.04 of 1, and the iteration limit stopped a two-unknown solve (LSMR's "
                "istop 7); the exact minimiser of a system this small costs milliseconds"),
)


register_method(Method(
    name="post-training", family="width",
    summary="post-training pruning (Kwon et al. 2022): heads and FFN neurons by Fisher "
            "information under a MAC budget, masks rearranged and tuned by least squares; "
            "no retraining",
    params=PostTrainingParams, budget="constraint", needs=frozenset({"train"}),
    run="glp.methods.post_training.prune:run",
    check="glp.methods.post_training.prune:check",
    followed_by=frozenset({"offline"}),
    reference="Kwon et al., \"A Fast Post-Training Pruning Framework for Transformers\", "
              "NeurIPS 2022; code WoosukKwon/retraining-free-pruning (main.py, prune/)",
    settings=SETTINGS))
