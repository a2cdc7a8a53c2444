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
from glp.methods import Method, check_number, param, register_method


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


register_method(Method(
    name="lowrank", family="offline",
    summary="truncated SVD of each matrix into two thin layers (--fisher: Fisher-weighted "
            "SVD, Hsu et al. 2022); smaller and faster, no fine-tuning",
    params=LowRankParams, budget="ratio", needs=frozenset({"selection"}),
    run="glp.methods.lowrank.svd:run", check="glp.methods.lowrank.svd:check",
    deterministic=True, variant=lambda p: "fisher" if p.fisher else "svd",
    suffix=lambda p: "-fisher" if p.fisher else ""))
