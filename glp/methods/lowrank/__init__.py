"""Low-rank factorisation of weight matrices: truncated SVD and Fisher-weighted SVD.

A rank-``r`` plan entry replaces one ``nn.Linear`` (``out x in``) by two thin ones,
``in -> r`` (no bias) then ``r -> out`` (the original bias): ``r * (in + out)`` weights
instead of ``in * out``, and as many fewer multiply-adds, so the model is smaller *and*
faster once ``r < in * out / (in + out)``. The word embeddings (``V x d``) become a
``V x r`` lookup followed by an ``r -> d`` projection (smaller, not faster: a lookup costs
nothing).

Two ways to choose the factors, both with no fine-tuning afterwards ("offline"):

- **SVD**: the best rank-``r`` approximation in Frobenius norm (Eckart-Young).
- **Fisher-weighted SVD** (Hsu et al., ICLR 2022): the task does not care about every
  weight equally. The empirical Fisher information of each weight (its squared gradient
  of the task loss, summed over the selection split) is summed per input dimension, and
  the factorisation minimises ``||(W - AB) diag(sqrt(I))||``: closed form, an SVD of
  ``W diag(sqrt(I))`` with the weighting undone on the input-side factor. For the word
  embeddings the weighting is per hidden dimension (the columns of ``E``).

Ratios: a module type compressed at ratio ``R`` stores ``1/R`` of its weights, so a
``n x m`` matrix gets ``r = floor(n * m / (R * (n + m)))`` (the reference code's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

from glp.core.anatomy import ROLES, parse_roles
from glp.methods import Method, Setting, check_number, param, register_method


@dataclass(frozen=True)
class LowRankParams:
    """Truncated SVD's settings: the ratio and the module types it factorises."""

    ratio: float = param(10.0, "compression ratio of each compressed module type")
    modules: tuple[str, ...] = param(ROLES, "module types to compress, comma-separated, "
                                     "from query, key, value, output, ffn_in, ffn_out, "
                                     "embeddings, or all")
    fisher: bool = param(False, "Fisher-weighted SVD (Fisher information of the task loss "
                         "on the selection split; Hsu et al. 2022)")
    fisher_examples: int = param(2048, "selection-split examples for the Fisher information")

    def __post_init__(self):
        check_number("ratio", self.ratio, self.ratio > 1,
                     "a compression ratio > 1 (10 keeps a tenth of each module type)")
        check_number("fisher_examples", self.fisher_examples, self.fisher_examples >= 1,
                     "at least 1 example")
        object.__setattr__(self, "modules", parse_roles(self.modules))


SETTINGS = (
    Setting("model compressed", "the pre-trained encoder (bert-base-uncased), fine-tuned "
            "afterwards on the task for 3 epochs (Banaei et al.); the fine-tuned model, "
            "optionally fine-tuned again (Hsu et al.)",
            fixed="the fine-tuned model, no fine-tuning afterwards",
            why="glp's offline family compresses the model it is given and trains nothing "
                "(minutes on a CPU, the last step on a model already trusted)"),
    Setting("matrices factorised together", "one SVD of a module type's matrices of every "
            "layer stacked (concatenated mode; Banaei et al.); one per matrix (Hsu et al.)",
            fixed="one SVD per matrix",
            why="per matrix, a layer's factors stay its own, so a layer can later be "
                "removed or sliced, and the rank rule is per matrix"),
    Setting("rank for ratio R of an n x m matrix", "floor(n m / (R (n + m)))",
            fixed="floor(n m / (R (n + m)))"),
    Setting("compression ratio", "10", param="ratio"),
    Setting("module types", "key only (config.yaml to_compress)", param="modules",
            why="glp compresses every matrix type by default, the size a deployment sees; "
                "--modules key is the reference's"),
    Setting("SVD solver", "sklearn TruncatedSVD (randomised), n_iter 1..29, the best by "
            "masked-LM perplexity on WikiText-103", fixed="exact SVD (torch.linalg.svd)",
            why="the exact SVD is the best rank-r approximation (Eckart-Young), which the "
                "randomised solver approaches as n_iter grows; WikiText-103 is not "
                "available offline"),
    Setting("Fisher weighting", "per input dimension, sqrt of the Fisher information summed "
            "over the output dimension (Hsu et al.)", fixed="the same, floored at 1e-3 of "
            "the largest", why="a dimension the examples never exercised would get weight 0 "
            "and an undefined inverse"),
    Setting("Fisher data", "the task's training split (Hsu et al.)",
            fixed="the selection split",
            why="the training split is not among an offline method's needs; the selection "
                "split has labels and is the task's own data"),
    Setting("Fisher examples", "the whole split", param="fisher_examples",
            why="2048 examples bound the CPU time; the estimate is a sum of squared "
                "gradients, stable well before the whole split"),
)
"""Truncated SVD's settings beside the reference code's: Banaei et al. 2023
(configs/config.yaml, utils/utils_funcs.py ``run_svd``; its SVD baseline) and Hsu et al.
2022 (Fisher-weighted SVD)."""


register_method(Method(
    name="lowrank", family="offline",
    summary="truncated SVD of each matrix into two thin layers (--fisher: Fisher-weighted "
            "SVD, Hsu et al. 2022); smaller and faster, no fine-tuning",
    params=LowRankParams, budget="ratio", needs=frozenset({"selection"}),
    run="glp.methods.lowrank.svd:run", check="glp.methods.lowrank.svd:check",
    deterministic=True, variant=lambda p: "fisher" if p.fisher else "svd",
    suffix=lambda p: "-fisher" if p.fisher else "",
    reference="truncated SVD as in the SVD baseline of Banaei, Balazy, Kasymov, Lebret, Tabor, "
              "Aberer, \"Revisiting Offline Compression: Going Beyond Factorization-based "
              "Methods for Transformer Language Models\", Findings of EACL 2023 (code "
              "MohammadrezaBanaei/auto-encoder-based-transformer-compression); Fisher-weighted "
              "SVD: Hsu, Hua, Chang, Lou, Shen, Jin, \"Language model compression with weighted "
              "low-rank factorization\", ICLR 2022",
    settings=SETTINGS))
