"""Autoencoder compression of weight matrices (Banaei et al., Findings of EACL 2023).

Following the reference code (MohammadrezaBanaei/auto-encoder-based-transformer-compression):
the rows of one module type's matrices, from every layer, are stacked ("concatenated"
mode: the layers are compressed together) and a small autoencoder is trained on them. Each
row is stored as its latent code; the decoder turns codes back into rows, and each decoded
row is rescaled to the original row's norm (``enforce_norm``; the norms are stored too).
The loss is ``0.9091 x cosine distance + 0.0909 x RMSE``, Adam at 1e-3 with the learning
rate times 0.8 every 10 epochs, batches of 16 rows, 30 epochs (the reference's 20 and its
10 additional ones). The latent size is the largest whose storage (codes + decoder +
norms) is at most ``1/ratio`` of the matrices.

Two protocols (``finetune_epochs``):

- the paper's (``finetune_epochs`` > 0, default 3): the *pre-trained* encoder the task's
  model was fine-tuned from is compressed, then the compressed model is fine-tuned on the
  task's training split with the codes and decoders trainable (the weights are computed
  from them in every forward pass), as the reference's GLUE scripts do;
- no retraining (``finetune_epochs`` 0, the ``-offline`` variant): the fine-tuned model
  itself is compressed and used as it is.

Two decoders:

- ``nonlinear`` (the reference's default): latent ``x -> 2x -> 4x -> m`` with LeakyReLU and
  a final tanh, encoder ``m -> 8x -> 4x -> x``. The model keeps its dense matrices: the
  checkpoint stores the codes, norms and decoder (``glp_codes.safetensors``) instead of
  the matrices, and ``glp.load_pretrained`` decodes them once. It saves storage, not time.
- ``linear``: a linear decoder ``W_rows = diag(a) (C D^T + 1 b^T)`` factorises exactly: the
  layer computes ``x -> [D^T; b^T] x`` (one ``(x+1) x m`` matrix shared by all layers of the
  type) then ``-> diag(a) [C_l, 1]``, so the model is smaller and faster, like low rank,
  but with the input-side factor shared across layers. Fine-tuning trains both factors.

Deviation: the reference stops early on masked-LM perplexity on WikiText-103 (not
available offline); glp keeps, per module type, the epoch with the lowest reconstruction
loss.

The family stays ``offline``: the family says what a method's model is and what may
follow it in a composition (weights coded or factorised, no structure removed), which
the fine-tune does not change; the training it does is in its phase records.
"""

from __future__ import annotations

from dataclasses import dataclass

from glp.core.anatomy import ROLES, parse_roles
from glp.methods import Method, ParamError, Setting, check_number, param, register_method

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
    epochs: int = param(30, "autoencoder training epochs (the epoch with the lowest "
                        "reconstruction loss is kept)", option="ae_epochs")
    batch_size: int = param(16, "rows per autoencoder batch", option="ae_batch_size")
    finetune_epochs: float = param(3.0, "epochs of task fine-tuning of the compressed "
                                   "pre-trained model, codes trainable (the paper's "
                                   "protocol); 0 compresses the fine-tuned model with no "
                                   "retraining", option="ae_finetune_epochs")

    def __post_init__(self):
        check_number("ratio", self.ratio, self.ratio > 1,
                     "a compression ratio > 1 (10 keeps a tenth of each module type)")
        if self.decoder not in DECODERS:
            raise ParamError("decoder", repr(self.decoder), f"one of {', '.join(DECODERS)}")
        for name in ("epochs", "batch_size"):
            check_number(name, getattr(self, name), getattr(self, name) >= 1, "1 or more")
        check_number("finetune_epochs", self.finetune_epochs, self.finetune_epochs >= 0,
                     "0 (no retraining) or a positive number of epochs, e.g. 3")
        object.__setattr__(self, "modules", parse_roles(self.modules))

    @property
    def retrains(self) -> bool:
        return self.finetune_epochs > 0


def _variant(params: AutoencoderParams) -> str:
    return params.decoder + ("" if params.retrains else "-offline")


def _suffix(params: AutoencoderParams) -> str:
    return ("-linear" if params.decoder == "linear" else "") + \
        ("" if params.retrains else "-offline")


SETTINGS = (
    Setting("compressed model", "the pre-trained encoder, then fine-tuned on the task",
            fixed="the pre-trained encoder, then fine-tuned on the task"),
    Setting("task fine-tuning epochs", "3", param="finetune_epochs"),
    Setting("trainable in the fine-tune", "codes, decoder and the rest of the model",
            fixed="codes, decoder and the rest of the model"),
    Setting("fine-tune learning rate, batch, length", "run_glue's (the HF Trainer)",
            fixed="--lr, --batch-size, --max-length",
            why="one fine-tune setting per job, the teacher's"),
    Setting("modules compressed", "one type per run (keys by default)", param="modules",
            why="glp compresses the six encoder types of a model in one run; --modules "
                "key is the reference's"),
    Setting("compression ratio", "10", param="ratio"),
    Setting("training mode", "concatenated (one autoencoder per type, all layers)",
            fixed="concatenated (one autoencoder per type, all layers)"),
    Setting("decoder", "nonlinear", param="decoder"),
    Setting("encoder / decoder hidden sizes", "8x, 4x / 2x, 4x the latent size",
            fixed="8x, 4x / 2x, 4x the latent size"),
    Setting("row norms kept (enforce_norm)", "True", fixed="True"),
    Setting("autoencoder epochs", "30", param="epochs"),
    Setting("autoencoder batch (rows)", "16", param="batch_size"),
    Setting("autoencoder optimiser", "Adam 1e-3, x0.8 every 10 epochs",
            fixed="Adam 1e-3, x0.8 every 10 epochs"),
    Setting("loss", "0.9091 cosine distance + 0.0909 L2", fixed="0.9091 cosine distance "
            "+ 0.0909 L2"),
    Setting("epoch kept", "early stopping on masked-LM perplexity (WikiText-103)",
            fixed="the lowest reconstruction loss",
            why="WikiText-103 is not available offline; the reconstruction loss needs no "
                "data"),
)
"""The autoencoder's settings beside the reference's (configs/config.yaml,
transformer_experiments/GLUE_experiments/glue_cfg.json)."""


register_method(Method(
    name="autoencoder", family="offline",
    summary="the reference autoencoder of a module type's matrices across layers (Banaei "
            "et al. 2023), then task fine-tuning with the codes trainable "
            "(--ae-finetune-epochs 0: none); --decoder nonlinear saves storage, linear "
            "also time",
    params=AutoencoderParams, budget="ratio", needs=frozenset({"train", "pretrained"}),
    run="glp.methods.autoencoder.compress:run", check="glp.methods.autoencoder.compress:check",
    variant=_variant, suffix=_suffix,
    reference="Banaei, Bałazy, Kasymov, Lebret, Tabor, Aberer, \"Revisiting Offline "
              "Compression: Going Beyond Factorization-based Methods for Transformer "
              "Language Models\", Findings of EACL 2023; code "
              "MohammadrezaBanaei/auto-encoder-based-transformer-compression "
              "(configs/config.yaml, transformer_experiments/GLUE_experiments/)",
    settings=SETTINGS))
