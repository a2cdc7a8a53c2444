"""What a user deploys: each depth as ONNX (fp32 and int8) against the unpruned PyTorch model.

The embedded MiniLM at every depth 6..1 (the top layers removed: every layer has the same
shape, so which ones does not matter for the time), each saved as glp saves a pruned model,
exported to ONNX fp32 and dynamic int8 (glp.deploy.export), and timed in PyTorch eager and in
onnxruntime, all 18 interleaved in one run (glp.deploy.bench) at batch 1 and 32 and lengths 32 and
128, synthetic batches without padding. Reported: each one's median and its speed-up over
the unpruned PyTorch model, the number a user replacing that model gets.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/deployed.py [--repeats 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from benchmarks.amdahl import depth_models
from glp.core.anatomy import encoder_layers
from glp.core.checkpoint import save_pretrained
from glp.core.models import load_tokenizer, resolve_model
from glp.deploy.bench import bench
from glp.deploy.export import OnnxModel, export_onnx

RUNTIMES = ("torch", "onnx", "onnx int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/deployed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    from transformers import AutoModelForSequenceClassification

    path = resolve_model(None)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    layers = len(encoder_layers(model))
    tokenizer = load_tokenizer(path)
    timed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pruned in depth_models(model).items():
            depth = int(name.split()[0])
            if depth == 0:
                continue
            folder = Path(tmp) / f"depth{depth}"
            save_pretrained(pruned, folder, tokenizer)
            timed[f"{depth} torch"] = pruned
            timed[f"{depth} onnx"] = OnnxModel(export_onnx(folder, folder / "model.onnx"),
                                               threads=args.threads, spin=False)
            timed[f"{depth} onnx int8"] = OnnxModel(
                export_onnx(folder, folder / "model.int8.onnx", int8=True),
                threads=args.threads, spin=False)
        shapes = [(b, n) for b in (1, 32) for n in (32, 128)]
        rows = bench(timed, shapes, model.get_input_embeddings().num_embeddings,
                     repeats=args.repeats)
    base = {(r["batch_size"], r["length"]): r["median_ms"] for r in rows
            if r["model"] == f"{layers} torch"}
    for row in rows:
        row["speedup"] = round(base[row["batch_size"], row["length"]] / row["median_ms"], 3)
    meta = {"threads": args.threads, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "repeats": args.repeats,
            "machine": platform.processor() or platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"all-MiniLM-L6-v2 (embedded), {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, {args.repeats} interleaved rounds; "
          f"median ms, and the speed-up over the unpruned ({layers}-layer) PyTorch model")
    print()
    print("| batch | length | depth | " + " | ".join(f"{r} ms | {r} ×" for r in RUNTIMES)
          + " |")
    print("| ---: | ---: | ---: |" + " ---: | ---: |" * len(RUNTIMES))
    found = {(r["batch_size"], r["length"], r["model"]): r for r in rows}
    for batch, length in shapes:
        for depth in range(layers, 0, -1):
            cells = []
            for runtime in RUNTIMES:
                row = found[batch, length, f"{depth} {runtime}"]
                cells += [f"{row['median_ms']:.2f}", f"{row['speedup']:.2f}×"]
            print(f"| {batch} | {length} | {depth} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
