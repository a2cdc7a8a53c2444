"""Autoencoder compression of weight matrices (Banaei et al., Findings of EACL 2023).

Following the reference code (MohammadrezaBanaei/auto-encoder-based-transformer-compression):
the rows of one module type's matrices, from every layer, are stacked ("concatenated"
mode: the layers are compressed together) and a small autoencoder is trained on them. Each
row is stored as its latent code; the decoder turns codes back into rows, and each decoded
row is rescaled to the original row's norm (``enforce_norm``; the norms are stored too).
The loss is ``0.9091 x cosine distance + 0.0909 x RMSE``, Adam at 1e-3 with the learning
rate times 0.8 every 10 epochs, batches of 16 rows. The latent size is the largest whose
storage (codes + decoder + norms) is at most ``1/ratio`` of the matrices.

Two decoders:

- ``nonlinear`` (the reference's default): latent ``x -> 2x -> 4x -> m`` with LeakyReLU and
  a final tanh, encoder ``m -> 8x -> 4x -> x``. The model keeps its dense matrices: the
  checkpoint stores the codes, norms and decoder (``glp_codes.safetensors``) instead of
  the matrices, and ``glp.load_pretrained`` decodes them once. It saves storage, not time.
- ``linear``: a linear decoder ``W_rows = diag(a) (C D^T + 1 b^T)`` factorises exactly: the
  layer computes ``x -> [D^T; b^T] x`` (one ``(x+1) x m`` matrix shared by all layers of the
  type) then ``-> diag(a) [C_l, 1]``, so the model is smaller and faster, like low rank,
  but with the input-side factor shared across layers.

Deviation: the reference stops early on masked-LM perplexity on WikiText-103 (not
available offline); glp keeps the epoch whose decoded weights score best on the task's
selection split (``evaluate``), or, without one, the lowest reconstruction loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from glp.core.anatomy import ROLES, parse_roles
from glp.methods import Method, ParamError, check_number, param, register_method

DECODERS = ("nonlinear", "linear")
"""``nonlinear`` saves storage; ``linear`` folds into thin layers and also saves time."""


@dataclass(frozen=True)
class AutoencoderParams:
    """The autoencoder's settings a user chooses (the rest are the reference's, in
    :class:`glp.methods.autoencoder.compress.AutoencoderConfig`)."""

    ratio: float = param(10.0, "compression ratio of each compressed module type")
    modules: tuple[str, ...] = param(ROLES, "module types to compress, comma-separated, "
                                     "from query, key, value, output, ffn_in, ffn_out, "
                                     "embeddings, or all")
    decoder: str = param("nonlinear", "nonlinear (the reference; saves storage) or linear "
                         "(thin layers; also saves time)")
    epochs: int = param(20, "training epochs (the best by the selection split is kept)",
                        option="ae_epochs")
    batch_size: int = param(16, "rows per batch", option="ae_batch_size")
    eval_every: int = param(1, "epochs between selection-split evaluations (the last epoch "
                            "is always evaluated)", option="ae_eval_every")

    def __post_init__(self):
        check_number("ratio", self.ratio, self.ratio > 1,
                     "a compression ratio > 1 (10 keeps a tenth of each module type)")
        if self.decoder not in DECODERS:
            raise ParamError("decoder", repr(self.decoder), f"one of {', '.join(DECODERS)}")
        for name in ("epochs", "batch_size", "eval_every"):
            check_number(name, getattr(self, name), getattr(self, name) >= 1, "1 or more")
        object.__setattr__(self, "modules", parse_roles(self.modules))


register_method(Method(
    name="autoencoder", family="offline",
    summary="the reference autoencoder of a module type's matrices across layers (Banaei "
            "et al. 2023); --decoder nonlinear saves storage, linear also time",
    params=AutoencoderParams, budget="ratio", needs=frozenset({"selection"}),
    run="glp.methods.autoencoder.compress:run", check="glp.methods.autoencoder.compress:check",
    variant=lambda p: p.decoder, suffix=lambda p: "-linear" if p.decoder == "linear" else ""))
