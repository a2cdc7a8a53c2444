"""How close layer pruning's speed-ups come to their limit (the Amdahl bound).

Removing L-L' of L encoder layers cannot make a model L/L' times faster: the embeddings,
the pooler and classifier (and, end to end, the tokenizer) still run. This script times
the model at every depth L..1 and with no encoder layer at all (the fixed part F), all
interleaved in one run (glp.deploy.bench), at batch 1 and 32 and lengths 32 and 128. From the
full model's time T(L), one layer costs b = (T(L) - F) / L, so the best depth L' can do is

    bound(L') = T(L) / (F + L' * b)

and each depth's measured speed-up T(L) / T(L') is reported as a fraction of it (and of
L/L'). Tokenisation is timed on the same rows (SST-2 dev sentences, padded to the length)
and reported beside, since a served model pays it too.

Which layers are removed does not matter for the time (every layer has the same shape), so
the top ones are.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/amdahl.py [--model DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from glp.core.anatomy import encoder_layers
from glp.core.models import load_tokenizer, resolve_model
from glp.core.surgery import remove_layers
from glp.deploy.bench import bench
from glp.training.data import load_glue_split


def depth_models(model: nn.Module) -> dict[str, nn.Module]:
    """``"L layers"`` for every depth, and ``"0 layers"`` (embeddings and head only)."""
    layers = len(encoder_layers(model))
    out = {}
    for depth in range(layers, 0, -1):
        out[f"{depth} layers"] = remove_layers(copy.deepcopy(model), range(depth, layers))
    fixed = copy.deepcopy(model)
    container = next(m for m in fixed.modules() if getattr(m, "layer", None) is
                     encoder_layers(fixed))
    container.layer = nn.ModuleList()  # the encoder loop runs no layer
    out["0 layers"] = fixed
    return out


def tokenisation_ms(tokenizer, texts: list[str], length: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                  return_tensors="pt")
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded MiniLM")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/amdahl.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification

    path = resolve_model(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    models = depth_models(model)
    layers = len(encoder_layers(model))
    shapes = [(b, n) for b in (1, 32) for n in (32, 128)]
    rows = bench(models, shapes, model.get_input_embeddings().num_embeddings,
                 repeats=args.repeats)
    tokenizer = load_tokenizer(path)
    texts = load_glue_split("sst2", Path("data/glue"), "dev")["text_a"][:32]
    results = []
    for batch, length in shapes:
        time_of = {r["model"]: r["median_ms"] for r in rows
                   if (r["batch_size"], r["length"]) == (batch, length)}
        full, fixed = time_of[f"{layers} layers"], time_of["0 layers"]
        per_layer = (full - fixed) / layers
        tok = tokenisation_ms(tokenizer, texts[:batch], length, args.repeats)
        for depth in range(layers, 0, -1):
            measured = full / time_of[f"{depth} layers"]
            bound = full / (fixed + depth * per_layer)
            results.append({"batch_size": batch, "length": length, "depth": depth,
                            "median_ms": time_of[f"{depth} layers"], "fixed_ms": fixed,
                            "tokenise_ms": round(tok, 3), "speedup": round(measured, 3),
                            "naive": round(layers / depth, 3), "bound": round(bound, 3),
                            "of_bound": round(measured / bound, 3),
                            "of_naive": round(measured / (layers / depth), 3)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(path), "threads": args.threads, "torch": torch.__version__,
        "python": platform.python_version(), "repeats": args.repeats, "rows": rows,
        "results": results}, indent=1) + "\n")
    name = args.model or "all-MiniLM-L6-v2 (embedded)"
    print(f"{name}, {layers} layers, {args.threads} threads, torch "
          f"{torch.__version__}, {args.repeats} interleaved rounds; speed-up against "
          f"{layers} layers, as a fraction of L/L' and of the Amdahl bound\n")
    print("| batch | length | fixed ms | tokenise ms | depth | ms | speed-up | L/L' | bound "
          "| of L/L' | of bound |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        if r["depth"] == layers:
            continue
        print(f"| {r['batch_size']} | {r['length']} | {r['fixed_ms']:.2f} | "
              f"{r['tokenise_ms']:.2f} | {r['depth']} | {r['median_ms']:.2f} | "
              f"{r['speedup']:.2f}× | {r['naive']:.2f}× | {r['bound']:.2f}× | "
              f"{r['of_naive']:.3f} | {r['of_bound']:.3f} |")


if __name__ == "__main__":
    main()
