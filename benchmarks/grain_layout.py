"""GRAIN's two attention layouts side by side: padded heads against grouped heads.

A GRAIN model keeps, in each head, its own number of query/key and value/output
dimensions. glp can run such a layer two ways (glp.core.attention):

- padded: every head padded to the layer's widest kept head, the projections' outputs
  scattered into that layout (every family);
- grouped: heads in at most 3 groups of their own widths, the projections' weights gathered
  into that order, no scatter (the BERT-like families; glp's default there).

From a run home of ``glp compare --methods`` (or ``glp compress --method grain``) on SST-2,
this builds one GRAIN model both ways, checks that they give the same logits, and times
them side by side with the unpruned model and MLPruning at the same density (the method that
removes whole heads, for "latency follows multiply-adds"): PyTorch eager, onnxruntime fp32
and int8, batch 1 and 32 (the first dev rows padded to their longest, as the comparison
times its models), every model interleaved round-robin (glp.deploy.bench). Each model's
encoder multiply-adds per token at the batch's length (linear layers, scores and
contexts) are reported beside its time.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/grain_layout.py --home HOME
       [--density 30] [--seed 40] [--repeats 30] [--out docs/benchmarks/grain_layout.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

from glp.core import anatomy
from glp.core.checkpoint import load_pretrained
from glp.core.models import load_tokenizer
from glp.deploy.bench import measure_latency
from glp.deploy.export import OnnxModel, export_onnx
from tasks.home import RunHome
from tasks.picking import read_finals


@contextmanager
def padded_layout():
    """Every family on the padded layout (what glp did before the grouped one)."""
    saved = dict(anatomy.FAMILIES)
    anatomy.FAMILIES.update({name: dataclasses.replace(family, grouped=False)
                             for name, family in saved.items()})
    try:
        yield
    finally:
        anatomy.FAMILIES.update(saved)


def encoder_macs(model, tokens: int) -> int:
    """Multiply-adds per token of the encoder at ``tokens`` tokens per row: its linear
    layers' weights, plus each head's scores and context (``tokens`` x its query/key and
    value/output widths, padding slots included: they are computed)."""
    import torch

    from glp.core.attention import GroupedSelfAttention

    layers = anatomy.encoder_layers(model)
    total = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    for layer in layers:
        attention = anatomy.get_module(layer, anatomy.family_of(model).attention)
        if isinstance(attention, GroupedSelfAttention):
            total += tokens * sum(count * (qk + vo) for count, qk, vo in attention.groups)
        else:
            total += tokens * 2 * attention.num_attention_heads * attention.attention_head_size
    return total


def batches(model_dir: str, max_length: int) -> dict[int, dict]:
    """Batch 1 and 32: the first SST-2 dev rows, padded to their longest."""
    tokenizer = load_tokenizer(model_dir)
    lines = Path("data/glue/SST-2/dev.tsv").read_text().splitlines()[1:]
    sentences = [line.split("\t")[0] for line in lines if line]
    return {size: dict(tokenizer(sentences[:size], padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt"))
            for size in (1, 32)}


def main() -> None:
    import numpy as np
    import onnxruntime
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--job", default=None)
    parser.add_argument("--density", default="30", help="the variant: density-DENSITY")
    parser.add_argument("--seed", type=int, default=None, help="default: the first seed")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/grain_layout.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [r for r in read_finals(RunHome.resolve(args.home)) if r["task"] == "sst2"
            and not r["diverged"] and r.get("model_dir") and Path(r["model_dir"]).is_dir()]
    grain_jobs = sorted({r["job_id"] for r in rows if r["strategy"] == "grain"})
    if not grain_jobs:
        raise SystemExit(f"{args.home}: no GRAIN model on SST-2")
    job = args.job or grain_jobs[-1]
    rows = [r for r in rows if r["job_id"] == job]
    seed = args.seed if args.seed is not None else min(r["seed"] for r in rows)
    variant = f"density-{args.density}"

    def find(strategy: str, variant: str | None) -> str | None:
        found = [r["model_dir"] for r in rows if r["strategy"] == strategy
                 and r["seed"] == seed and (variant is None or r["variant"] == variant)]
        return found[0] if found else None

    grain = find("grain", variant)
    if grain is None:
        raise SystemExit(f"job {job}: no GRAIN model at {variant}, seed {seed}")
    sources = {"unpruned": find("unpruned", None), "MLPruning": find("mlpruning", variant)}
    sources = {name: path for name, path in sources.items() if path}
    data = batches(grain, args.max_length)

    timed, macs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        built = [(f"GRAIN {variant} padded", grain, True),
                 (f"GRAIN {variant} grouped", grain, False)]
        built += [(f"{name}" + (f" {variant}" if name != "unpruned" else ""), path, False)
                  for name, path in sources.items()]
        for index, (name, path, padded) in enumerate(built):
            with padded_layout() if padded else nullcontext():
                model = load_pretrained(path).eval()
                fp32 = export_onnx(path, Path(tmp) / f"{index}.onnx")
                int8 = export_onnx(path, Path(tmp) / f"{index}.int8.onnx", int8=True)
            macs[name] = {size: encoder_macs(model, batch["input_ids"].shape[1])
                          for size, batch in data.items()}
            timed[f"{name} | torch"] = model
            timed[f"{name} | onnx"] = OnnxModel(fp32, threads=args.threads, spin=False)
            timed[f"{name} | onnx int8"] = OnnxModel(int8, threads=args.threads, spin=False)
        with torch.inference_mode():
            padded, grouped = (timed[f"{built[i][0]} | {r}"](**data[32]).logits
                               for i, r in ((0, "torch"), (1, "torch")))
            difference = float((torch.as_tensor(padded) - torch.as_tensor(grouped)).abs().max())
        print(f"logits, padded against grouped (batch 32): max difference {difference:.2e}")
        results = []
        for size, batch in data.items():
            latencies = measure_latency(timed, batch, repeats=args.repeats)
            for runtime in ("torch", "onnx", "onnx int8"):
                base = latencies[f"unpruned | {runtime}"].median_ms if sources.get(
                    "unpruned") else None
                for name, *_ in built:
                    stats = latencies[f"{name} | {runtime}"]
                    speedup = base / stats.median_ms if base else None
                    results.append({"model": name, "runtime": runtime, "batch": size,
                                    "tokens": stats.tokens, "median_ms": round(stats.median_ms, 3),
                                    "p90_ms": round(stats.p90_ms, 3),
                                    "speedup_vs_unpruned": speedup and round(speedup, 2),
                                    "encoder_macs_per_token": macs[name][size]})
                    print(f"batch {size:>2} {runtime:<9} {name:<28} {stats.median_ms:8.2f} ms"
                          + (f"  {speedup:5.2f}x" if speedup else "")
                          + f"  {macs[name][size] / 1e6:5.2f} M MACs/token", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/grain_layout.py "
                   f"--home {args.home} --density {args.density} --repeats {args.repeats}",
        "job": job, "seed": seed, "max_length": args.max_length, "threads": args.threads,
        "repeats": args.repeats, "max_logit_difference": difference,
        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
