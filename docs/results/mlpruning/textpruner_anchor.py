"""TextPruner as a side-by-side anchor: the same teacher pruned to the same sizes.

TextPruner (PyPI ``textpruner``) scores heads and FFN neurons by their gradient-based
importance on training batches and prunes them, iteratively, without training. Version
1.0.post3 installs with transformers 5 but its slicing calls ``model.prune_heads``, which
transformers 5 removed; so TextPruner computes its masks (``keep_shape=True``), and glp's
``apply_plan`` slices a fresh copy of the teacher to them. Every layer keeps the same number
of heads and neurons (TextPruner's even masking), chosen so the encoder density is at most
the target. The teacher is the unpruned seed-40 model of the run home; the batches are the
run's own training rows; dev accuracy on the full SST-2 dev set.

Usage: PYTHONPATH=. .venv/bin/python docs/results/mlpruning/textpruner_anchor.py HOME [DENSITY ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.dataset as ds
import torch

import glp
from glp.core.models import load_tokenizer
from glp.core.plan import Plan
from glp.core.surgery import apply_plan
from glp.training.data import collate, load_glue_split, tokenize
from glp.training.train import evaluate


def sizes_for(config, density: float) -> tuple[int, int, float]:
    """(heads, neurons) per layer, the largest with the same fraction of each whose
    encoder density is at most ``density``; and that density."""
    heads, neurons, layers = (config.num_attention_heads, config.intermediate_size,
                              config.num_hidden_layers)
    best = (1, 1, 0.0)
    for h in range(1, heads + 1):
        for n in range(max(1, round(neurons * h / heads) - 64), neurons + 1, 8):
            plan = Plan(layers, heads={i: tuple(range(h)) for i in range(layers)},
                        neurons={i: tuple(range(n)) for i in range(layers)})
            value = plan.encoder_density(config)
            if value <= density and value > best[2]:
                best = (h, n, value)
            if value > density:
                break
    return best


def main(home: Path, densities: list[float]) -> None:
    import tempfile

    from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig

    scratch = Path(tempfile.mkdtemp())  # TextPruner writes its importance files there

    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    teacher_row = next(r for r in sorted(rows, key=lambda r: r["recorded_at"])
                       if r["method"] == "unpruned" and r["seed"] == 40)
    teacher_dir = teacher_row["model_dir"]
    tokenizer = load_tokenizer(teacher_dir)
    from tasks.data import read_split

    # The run's training split (2,000 rows); a home holds one for this budget.
    train_files = sorted(home.glob("data/train-*.parquet"))
    if len(train_files) != 1:
        raise SystemExit(f"expected one prepared training split in {home / 'data'}, "
                         f"found {len(train_files)}")
    train = tokenize(read_split(str(train_files[0])), tokenizer, max_length=64)
    batches = [collate(train, range(i, min(i + 32, len(train))), tokenizer.pad_token_id)
               for i in range(0, len(train), 32)]
    dev = tokenize(load_glue_split("sst2", Path("data/glue"), "dev"), tokenizer, max_length=64)
    results = []
    for density in densities:
        base = glp.load_pretrained(teacher_dir)
        heads, neurons, reached = sizes_for(base.config, density)
        pruner = TransformerPruner(
            base, general_config=GeneralConfig(output_dir=str(scratch)),
            transformer_pruning_config=TransformerPruningConfig(
                target_ffn_size=neurons, target_num_of_heads=heads,
                pruning_method="iterative", n_iters=4))
        pruner.prune(dataloader=batches, save_model=False, keep_shape=True)
        head_mask, ffn_mask = pruner.head_mask.bool(), pruner.ffn_mask.bool()
        layers = base.config.num_hidden_layers
        plan = Plan(layers,
                    heads={i: tuple(torch.nonzero(head_mask[i]).flatten().tolist())
                           for i in range(layers)},
                    neurons={i: tuple(torch.nonzero(ffn_mask[i]).flatten().tolist())
                             for i in range(layers)})
        model = apply_plan(glp.load_pretrained(teacher_dir), plan)
        metrics = evaluate(model, dev, is_regression=False)
        results.append({"target_density": density, "heads_per_layer": heads,
                        "neurons_per_layer": neurons,
                        "encoder_density": plan.encoder_density(base.config),
                        "planned_density": reached, "accuracy": metrics["accuracy"]})
        print(json.dumps(results[-1]), flush=True)
    teacher = evaluate(glp.load_pretrained(teacher_dir), dev, is_regression=False)
    print(json.dumps({"teacher_accuracy": teacher["accuracy"]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [float(d) for d in sys.argv[2:]] or [0.5, 0.3, 0.2])
