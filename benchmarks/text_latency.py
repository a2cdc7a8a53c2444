"""What a user of a deployed model waits for: text in, label out, tokenizer included.

From a run home that ``glp compare --methods`` wrote on SST-2 (its finals Parquet, one
job: ``--job``, else the job with the most methods), every final model's int8 dev score
(the ``int8_value`` column where the run has it; otherwise computed here as glp computes
it: the int8 text-in graph of each seed's model on the 872 dev sentences, max length 64),
and three text-in models as glp registers them (glp.deploy.export.write_text_model, served by
glp.deploy.text_model.TextModel, the code every registered version runs):

- the unpruned model, fp32 ONNX;
- the unpruned model, int8 ONNX (what a user who does not use glp deploys);
- the fastest pruned model whose int8 graph keeps at least ``--keep`` (0.99) of the
  unpruned model's mean dev score (its int8 mean over seeds, against the unpruned fp32
  mean), by the int8 latency at batch 32 the comparison measured.

Each is timed on dev sentences, batch 1 and batch 32, the three interleaved round-robin in
one process so that a stall of the machine hits them alike; reported: median and 90th
percentile milliseconds per call, and the speed-ups over unpruned int8.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/text_latency.py --home HOME
       [--keep 0.99] [--repeats 30] [--out docs/benchmarks/text_latency.json]
(SST-2: the sentences are data/glue/SST-2/dev.tsv's)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from glp.deploy.export import write_text_model
from glp.deploy.text_model import TextModel
from glp.methods import REFERENCE
from glp.report.pareto import method_of, size_of
from glp.report.pick import models
from tasks.home import RunHome
from tasks.picking import read_finals


def int8_scores(rows: list[dict], max_length: int) -> None:
    """Fill in ``int8_value`` where the run did not score it (a run from before glp did):
    each model's int8 text-in graph on the SST-2 dev sentences, accuracy, as
    :func:`tasks.deployment.run_int8_evaluation` computes it."""
    import numpy as np

    from glp.training.metrics import compute_metrics, selection_score

    lines = Path("data/glue/SST-2/dev.tsv").read_text().splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines if line]
    labels = np.asarray([int(line.split("\t")[1]) for line in lines if line])
    todo = [r for r in rows if r.get("int8_value") is None and not r["diverged"]
            and r.get("model_dir") and Path(r["model_dir"]).is_dir()]
    done: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count, row in enumerate(todo):
            if row["model_dir"] not in done:
                folder = write_text_model(row["model_dir"], Path(tmp) / str(count),
                                          labels=("0", "1"), max_length=max_length,
                                          int8=True)
                metrics = compute_metrics(TextModel(folder).logits(texts), labels,
                                          is_regression=False)
                done[row["model_dir"]] = selection_score(metrics, "accuracy")
            row["int8_value"] = done[row["model_dir"]]
            print(f"int8 {count + 1}/{len(todo)}: {row['strategy']} {row['variant']} "
                  f"seed {row['seed']}: {row['value']:.4f} fp32, {row['int8_value']:.4f} int8",
                  flush=True)


def choose(rows: list[dict], keep: float):
    """The unpruned model and the fastest pruned one keeping ``keep`` of its score in int8."""
    found = models(rows)
    reference = next(m for m in found if m.strategy == REFERENCE)
    floor = keep * reference.mean
    kept = [m for m in found if m.strategy != REFERENCE and m.int8_mean is not None
            and m.int8_mean >= floor and m.extra.get("int8_b32_ms")]
    if not kept:
        raise SystemExit(f"no pruned model keeps {keep:g} of {reference.mean:.4f} in int8")
    return reference, min(kept, key=lambda m: m.extra["int8_b32_ms"]), floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--keep", type=float, default=0.99)
    parser.add_argument("--job", default=None)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/text_latency.json"))
    args = parser.parse_args()
    import onnxruntime
    import tokenizers

    rows = [r for r in read_finals(RunHome.resolve(args.home)) if r["task"] == "sst2"]
    methods: dict[str, set] = {}
    for row in rows:
        methods.setdefault(row["job_id"], set()).add(row["method"])
    job = args.job or max(methods, key=lambda j: len(methods[j]))
    rows = [r for r in rows if r["job_id"] == job]
    int8_scores(rows, args.max_length)
    reference, best, floor = choose(rows, args.keep)
    every = [{"method": method_of(m), "size": size_of(m), "fp32": round(m.mean, 4),
              "fp32_std": round(m.std, 4), "int8": m.int8_mean and round(m.int8_mean, 4),
              "int8_std": m.int8_std and round(m.int8_std, 4), "seeds": m.seeds,
              "int8_b1_ms": m.extra.get("int8_b1_ms"), "int8_b32_ms": m.extra.get("int8_b32_ms")}
             for m in models(rows)]
    lines = Path("data/glue/SST-2/dev.tsv").read_text().splitlines()[1:]
    sentences = [line.split("\t")[0] for line in lines if line]
    spec = {"labels": ("0", "1"), "max_length": args.max_length}
    with tempfile.TemporaryDirectory() as tmp:
        built = {"unpruned fp32": (reference.model_dir, False),
                 "unpruned int8": (reference.model_dir, True),
                 f"{method_of(best)} ({size_of(best)}) int8": (best.model_dir, True)}
        # No spinning: a session's threads that spin after each call would take the cores
        # from the next model in the round (a server runs one model, and spins).
        served = {name: TextModel(write_text_model(path, Path(tmp) / str(i), int8=int8, **spec),
                                  threads=args.threads, spin=False)
                  for i, (name, (path, int8)) in enumerate(built.items())}
        results = []
        for batch in (1, 32):
            times: dict[str, list[float]] = {name: [] for name in served}
            for repeat in range(args.repeats + 3):  # 3 warm-up rounds, not counted
                texts = [sentences[(repeat * batch + i) % len(sentences)]
                         for i in range(batch)]
                names = list(served)
                shift = repeat % len(names)  # the order rotates, as glp.deploy.bench's does
                for name in names[shift:] + names[:shift]:
                    model = served[name]
                    start = time.perf_counter()
                    model.predict(texts)
                    if repeat >= 3:
                        times[name].append((time.perf_counter() - start) * 1000)
            base = statistics.median(times["unpruned int8"])
            for name, values in times.items():
                median = statistics.median(values)
                results.append({"model": name, "batch": batch, "median_ms": round(median, 2),
                                "p90_ms": round(sorted(values)[int(0.9 * len(values))], 2),
                                "speedup_vs_unpruned_int8": round(base / median, 2)})
                print(f"batch {batch:>2}  {name:<40} {median:8.2f} ms  "
                      f"{base / median:5.2f}x vs unpruned int8")
    record = {"home": str(args.home), "task": "sst2", "keep": args.keep,
              "floor": round(floor, 4),
              "unpruned": {"fp32_mean": round(reference.mean, 4),
                           "fp32_std": round(reference.std, 4),
                           "int8_mean": reference.int8_mean and round(reference.int8_mean, 4),
                           "seeds": reference.seeds},
              "best": {"method": method_of(best), "size": size_of(best),
                       "fp32_mean": round(best.mean, 4), "int8_mean": round(best.int8_mean, 4),
                       "int8_std": round(best.int8_std, 4), "seeds": best.seeds},
              "results": results, "models": every, "job": job,
              "repeats": args.repeats, "threads": args.threads,
              "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__,
              "machine": platform.platform(), "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
