"""CPU latency of compressed models against their teacher: PyTorch and onnxruntime, batch 1
and 32, all models timed in one interleaved run (glp.deploy.bench.measure_latency).

Reads a run home's ``parquet/finals`` and takes, from the latest job of each kind, the
first seed's model of every budget: the unpruned teacher, each MLPruning density (with and
without level-3 blocks), each GRAIN density (with and without factorised embeddings), and
each greedy depth. Each is timed as PyTorch eager, as an ONNX
graph (fp32) and as int8 ONNX; a model with block masks also with its matrices in PyTorch's
block-sparse (BSR) format. Batches are the first rows of the SST-2 dev set, padded to their
longest row; onnxruntime's threads do not spin between runs, so that they leave the cores
to the next model timed. The ONNX graphs' dev accuracy is measured too (what int8 costs). Writes a
JSON file of medians and 90th percentiles.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/compressed_latency.py HOME [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import pyarrow.dataset as ds
import torch

import glp
from glp.core.models import load_tokenizer
from glp.core.plan import Plan
from glp.deploy.bench import latency_batch, measure_latency
from glp.deploy.export import OnnxModel, export_onnx
from glp.training.data import load_glue_split, tokenize


def pick_models(home: Path) -> dict[str, dict]:
    """label -> finals row of the first seed, for the latest job of each method."""
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    latest: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: r["recorded_at"]):
        plan = json.loads(row["plan"] or "{}")
        latest[f"{row['method']}|{plan.get('blocks') != {}}|{'ranks' in plan}"
               if row["method"] != "unpruned" else "unpruned"] = row["job_id"]
    jobs = set(latest.values())
    first_seed = min(r["seed"] for r in rows)
    chosen = {}
    for row in rows:
        if row["job_id"] not in jobs or row["seed"] != first_seed or not row["model_dir"]:
            continue
        if row["method"] == "unpruned":
            label = "unpruned"
        elif row["method"] == "layers":
            label = f"greedy {row['depth']} layers"
        else:
            label = width_label(row)
        chosen.setdefault(label, row)
    return chosen


def width_label(row: dict) -> str:
    """``mlpruning 0.3``, ``mlpruning 0.3 + blocks``, ``grain 0.1`` (embeddings factorised,
    GRAIN's default) or ``grain 0.1, full embeddings``."""
    plan = Plan.from_json(row["plan"])
    label = f"{row['method']} {row['target_density']:g}"
    if plan.blocks:
        label += " + blocks"
    if row["method"] == "grain" and not plan.ranks:
        label += ", full embeddings"
    return label


def block_sparse(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """The model with every encoder matrix whose shape the block size divides stored as
    BSR (those with partial edge blocks stay dense)."""
    from glp.core.anatomy import encoder_layers

    for linear in encoder_layers(model).modules():
        if isinstance(linear, torch.nn.Linear) and not (
                linear.weight.shape[0] % size or linear.weight.shape[1] % size):
            weight = linear.weight.detach().to_sparse_bsr((size, size))
            bias = linear.bias

            def forward(x, weight=weight, bias=bias):
                flat = x.reshape(-1, x.shape[-1])
                # sparse @ dense (F.linear with a BSR weight fails under inference_mode)
                out = (weight @ flat.T).T
                out = out + bias if bias is not None else out
                return out.reshape(*x.shape[:-1], out.shape[-1])

            linear.forward = forward
    return model


def storage(model_dir: Path) -> dict[str, float]:
    """The weights file's size, and gzipped (zeroed blocks are stored as zeros, so only a
    compressed or sparse format saves their space)."""
    import gzip

    weights = sorted(model_dir.glob("*.safetensors"))
    raw = sum(f.stat().st_size for f in weights)
    packed = sum(len(gzip.compress(f.read_bytes(), compresslevel=1)) for f in weights)
    return {"safetensors_mb": round(raw / 1e6, 2), "gzip_mb": round(packed / 1e6, 2)}


def onnx_accuracy(model: OnnxModel, dev, batch_size: int = 64) -> float:
    """Accuracy of an exported graph on the dev rows (what int8 quantisation costs)."""
    import numpy as np

    from glp.training.data import collate

    correct = 0
    for start in range(0, len(dev), batch_size):
        indices = range(start, min(start + batch_size, len(dev)))
        batch = collate(dev, indices, 0)
        labels = batch.pop("labels").numpy()
        correct += int((np.argmax(model(**batch).logits, axis=-1) == labels).sum())
    return correct / len(dev)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path)
    parser.add_argument("--out", type=Path, default=Path("latency.json"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    chosen = pick_models(args.home)
    if not chosen:
        raise SystemExit(f"no final models in {args.home / 'parquet' / 'finals'}")
    teacher_dir = chosen["unpruned"]["model_dir"]
    tokenizer = load_tokenizer(teacher_dir)
    dev = tokenize(load_glue_split("sst2", Path("data/glue"), "dev"), tokenizer,
                   max_length=args.max_length)
    models, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, row in chosen.items():
            plan = Plan.from_json(row["plan"]) if row["plan"] else None
            info[label] = {k: row[k] for k in ("method", "variant", "depth", "parameters",
                                              "encoder_density", "model_dir", "value")}
            models[f"{label} | torch"] = glp.load_pretrained(row["model_dir"])
            onnx = export_onnx(row["model_dir"], Path(tmp) / f"{len(models)}.onnx")
            int8 = export_onnx(row["model_dir"], Path(tmp) / f"{len(models)}.int8.onnx",
                               int8=True)
            info[label].update(storage(Path(row["model_dir"])))
            info[label]["onnx_mb"] = round(onnx.stat().st_size / 1e6, 2)
            info[label]["int8_mb"] = round(int8.stat().st_size / 1e6, 2)
            threads = torch.get_num_threads()
            models[f"{label} | onnx"] = OnnxModel(onnx, threads=threads, spin=False)
            models[f"{label} | onnx int8"] = OnnxModel(int8, threads=threads, spin=False)
            for runtime in ("onnx", "onnx int8"):
                info[label][f"{runtime} accuracy"] = round(
                    onnx_accuracy(models[f"{label} | {runtime}"], dev), 4)
            if plan is not None and plan.blocks:
                size = next(iter(plan.blocks.values())).size
                models[f"{label} | torch bsr"] = block_sparse(
                    glp.load_pretrained(row["model_dir"]), size)
        results = {}
        for batch_size in args.batch_sizes:
            batch = latency_batch(dev, batch_size, pad_id=tokenizer.pad_token_id or 0)
            stats = measure_latency(models, batch, repeats=args.repeats)
            results[str(batch_size)] = {
                name: {"median_ms": round(s.median_ms, 3), "p90_ms": round(s.p90_ms, 3),
                       "tokens": s.tokens} for name, s in stats.items()}
            print(f"batch {batch_size}: " + "; ".join(
                f"{name} {s.median_ms:.1f} ms" for name, s in stats.items()), flush=True)
    import onnxruntime

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.node()} {platform.machine()}", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "repeats": args.repeats, "models": info, "latency": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
