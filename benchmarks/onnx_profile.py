"""Where an exported graph spends its time: onnxruntime's own profile, by operator type.

Each model directory is exported as glp exports it (glp.deploy.export.export_onnx, int8
unless --fp32) and run with onnxruntime's profiler on random token ids, ``--rounds`` runs
at each of batch 1 and 32 (length ``--length``); printed: the kernel time per run and the
share of the largest operator types, with how many nodes of each run per call. For
finding what a layout costs beyond its multiply-adds (GRAIN's padded heads: the scatter
and gather around the projections).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/onnx_profile.py DIR [DIR ...]
       [--fp32] [--length 64] [--rounds 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np


def profile(graph: Path, prefix: Path, length: int, rounds: int, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    runs = 0
    for batch in (1, 32):
        feed = {"input_ids": rng.integers(1000, 20000, (batch, length)),
                "attention_mask": np.ones((batch, length), dtype=np.int64),
                "token_type_ids": np.zeros((batch, length), dtype=np.int64)}
        feed = {i.name: feed[i.name] for i in session.get_inputs()}
        for _ in range(rounds):
            session.run(None, feed)
            runs += 1
    events = json.loads(Path(session.end_profiling()).read_text())
    time, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    return time, count, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    from glp.deploy.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        for index, model in enumerate(args.models):
            graph = export_onnx(model, Path(tmp) / f"{index}.onnx", int8=not args.fp32)
            time, count, runs = profile(graph, Path(tmp) / str(index), args.length,
                                        args.rounds, args.threads)
            total = sum(time.values())
            print(f"{model}: {total / runs / 1000:.2f} ms of kernels per run (batch 1 and 32 "
                  f"averaged)")
            for op, spent in time.most_common(args.top):
                print(f"  {op:<28} {100 * spent / total:5.1f}%  {count[op] // runs:>4} nodes")


if __name__ == "__main__":
    main()
