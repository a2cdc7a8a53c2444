"""The names of glp's strategies and methods: one definition for the library, the flows,
the report and the CLI's help (importing this module costs nothing: no torch)."""

from __future__ import annotations

REFERENCE = "unpruned"
"""The strategy (and method) name of the reference row: the fine-tuned unpruned model."""

LAYER_METHOD = "layers"
"""The method name of every layer strategy's rows."""

STRATEGY_NAMES: tuple[str, ...] = ("greedy", "top", "bottom", "random", "exhaustive",
                                   "block-influence", "angular")
"""Layer strategies, in display order (``glp.methods.layers.search.STRATEGIES`` has one class
for each)."""

WIDTH_METHODS: dict[str, str] = {
    "mlpruning": "MLPruning (Yao et al. 2021): heads, FFN neurons, blocks; learnable Top-k "
                 "thresholds, adaptive regulariser, distillation",
    "grain": "GRAIN (Yang et al. 2023): query/key and value/output dimensions of each head, "
             "FFN neurons; Taylor importance, cubic schedule, distillation with gradient "
             "separation",
}
"""Width-compression methods of ``glp compress --method``, with a one-line description."""

OFFLINE_METHODS: dict[str, str] = {
    "lowrank": "truncated SVD of each matrix into two thin layers (--fisher: Fisher-weighted "
               "SVD, Hsu et al. 2022); smaller and faster, no fine-tuning",
    "autoencoder": "the reference autoencoder of a module type's matrices across layers "
                   "(Banaei et al. 2023); --decoder nonlinear saves storage, linear also time",
}
"""Offline methods of ``glp compress --method``: they compress a fine-tuned model's weights
with no further fine-tuning."""
