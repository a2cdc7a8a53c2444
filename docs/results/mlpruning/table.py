"""The width-compression table (MLPruning, GRAIN, greedy): quality over seeds from a run
home's finals, latency from the benchmark's JSON (benchmarks/compressed_latency.py), as
markdown.

Usage: PYTHONPATH=. .venv/bin/python docs/results/mlpruning/table.py HOME LATENCY_JSON
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pyarrow.dataset as ds

from benchmarks.compressed_latency import width_label


def label_of(row: dict) -> str:
    if row["method"] == "unpruned":
        return "unpruned"
    if row["method"] == "layers":
        return f"greedy {row['depth']} layers"
    return width_label(row)


def main(home: Path, latency_file: Path) -> None:
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    latency = json.loads(latency_file.read_text())
    groups: dict[str, dict[str, dict]] = {}
    for row in sorted(rows, key=lambda r: r["recorded_at"]):
        if row["method"] == "layers" and row["strategy"] != "greedy":
            continue
        # Every job writes its own copy of the unpruned rows, and a code change re-trains
        # them (the same scores, deterministic, under a new key): one row per seed, the
        # latest.
        groups.setdefault(label_of(row), {})[row["seed"]] = row
    models = {label: list(members.values()) for label, members in groups.items()}
    order = sorted(models, key=lambda k: (-statistics.mean(
        r["encoder_density"] for r in models[k]), k))
    timing = latency["latency"]

    def ms(label: str, runtime: str, batch: str) -> float | None:
        entry = timing.get(batch, {}).get(f"{label} | {runtime}")
        return entry["median_ms"] if entry else None

    base = {b: ms("unpruned", "torch", b) for b in timing}
    seeds = sorted({r["seed"] for r in rows})
    print(f"SST-2 dev accuracy (872 rows), mean ± std over seeds {seeds}; "
          f"int8 accuracy: the first seed's model as int8 ONNX; "
          f"latency: median ms on {latency['threads']} CPU threads (torch {latency['torch']}, "
          f"onnxruntime {latency['onnxruntime']}), SST-2 dev rows padded to the longest, "
          f"{latency['repeats']} interleaved rounds; speed-up against the unpruned model in "
          "PyTorch at the same batch size.\n")
    print("| model | encoder density | parameters | dev accuracy | int8 accuracy | torch b1 | "
          "torch b32 | onnx b1 | onnx b32 | onnx int8 b32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label in order:
        members = models[label]
        values = [r["value"] for r in members if not r["diverged"]]
        spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        score = f"{statistics.mean(values):.4f}{spread}" if values else "diverged"
        cells = []
        for runtime, batch in (("torch", "1"), ("torch", "32"), ("onnx", "1"), ("onnx", "32"),
                               ("onnx int8", "32")):
            value = ms(label, runtime, batch)
            cells.append("" if value is None else
                         f"{value:.1f} ({base[batch] / value:.2f}×)" if base.get(batch) else
                         f"{value:.1f}")
        first = members[0]
        int8 = latency["models"].get(label, {}).get("onnx int8 accuracy")
        int8_cell = "" if int8 is None else f"{int8:.4f}"
        print(f"| {label} | {statistics.mean(r['encoder_density'] for r in members):.3f} | "
              f"{first['parameters']:,} | {score} | {int8_cell} | " + " | ".join(cells) + " |")
    print("\nStorage (MB): the safetensors file, gzipped (level 1), the ONNX graph and the "
          "int8 graph.\n")
    print("| model | safetensors | gzip | onnx | onnx int8 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label in order:
        sizes = latency["models"].get(label)
        if sizes:
            print(f"| {label} | {sizes['safetensors_mb']:.1f} | {sizes['gzip_mb']:.1f} | "
                  f"{sizes['onnx_mb']:.1f} | {sizes['int8_mb']:.1f} |")
    bsr = {b: ms(label, "torch bsr", b) for label in order for b in timing
           if ms(label, "torch bsr", b)}
    if bsr:
        blocks = next(label for label in order if ms(label, "torch bsr", "32"))
        print(f"\n{blocks}, matrices as block-sparse (BSR) tensors in PyTorch: "
              + ", ".join(f"batch {b} {ms(blocks, 'torch bsr', b):.1f} ms (dense "
                          f"{ms(blocks, 'torch', b):.1f} ms)" for b in timing) + ".")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
