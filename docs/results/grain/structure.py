"""What GRAIN kept, layer by layer: heads left (a head with a value dimension), query/key
and value/output dimensions per kept head (min-max), and FFN neurons, for the first seed's
model of each density in a run home.

Usage: PYTHONPATH=. .venv/bin/python docs/results/grain/structure.py HOME
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.dataset as ds
from transformers import AutoConfig

from benchmarks.compressed_latency import width_label
from glp.core.plan import Plan


def describe(plan: Plan, layers: int, heads: int, size: int, neurons: int) -> list[str]:
    cells = []
    for layer in range(layers):
        qk = plan.qk.get(layer, range(heads * size))
        vo = plan.vo.get(layer, range(heads * size))
        kept = sorted({d // size for d in vo})
        per_qk = [sum(1 for d in qk if d // size == h) for h in kept]
        per_vo = [sum(1 for d in vo if d // size == h) for h in kept]
        ffn = len(plan.neurons.get(layer, range(neurons)))
        cells.append(f"{len(kept)} heads, qk {min(per_qk)}–{max(per_qk)}, "
                     f"vo {min(per_vo)}–{max(per_vo)}, FFN {ffn}")
    return cells


def main(home: Path) -> None:
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    grain = [r for r in rows if r["method"] == "grain" and r["model_dir"]]
    first = min(r["seed"] for r in grain)
    chosen = {width_label(r): r for r in sorted(grain, key=lambda r: r["recorded_at"])
              if r["seed"] == first}
    config = AutoConfig.from_pretrained(next(iter(chosen.values()))["model_dir"])
    heads, layers = config.num_attention_heads, Plan.from_json(grain[0]["plan"]).num_layers
    size, neurons = config.hidden_size // heads, config.intermediate_size
    print(f"Kept per layer (seed {first}; the base model has {heads} heads of {size} "
          f"dimensions and {neurons} FFN neurons per layer; qk/vo: dimensions per kept "
          "head, min–max).\n")
    print("| model | " + " | ".join(f"layer {i}" for i in range(layers)) + " |")
    print("| --- |" + " --- |" * layers)
    for label in sorted(chosen, key=lambda k: -chosen[k]["target_density"]):
        plan = Plan.from_json(chosen[label]["plan"])
        print(f"| {label} | " + " | ".join(describe(plan, layers, heads, size, neurons)) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
