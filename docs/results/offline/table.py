"""Markdown tables from benchmarks/offline_compression.py's JSON lines (one file per task).

    python docs/results/offline/table.py sst2.jsonl [stsb.jsonl ...]
    python docs/results/offline/table.py --spread sst2.jsonl sst2-spread.jsonl

``--spread``: the files hold several teachers (fine-tuned with different seeds) of one task;
the table gives the mean ± standard deviation over teachers per module type and method.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

METHODS = ("svd", "fisher-svd", "ae-linear", "ae-nonlinear")
SETS = ("query", "key", "value", "output", "ffn_in", "ffn_out", "embeddings", "all")


def main(paths: list[str]) -> None:
    for path in paths:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        given = next(r for r in rows if r.get("method") == "input")
        results = [r for r in rows if r.get("method") in METHODS]
        latency = {r["latency"]: r for r in rows if "latency" in r}
        print(f"### {given['task']}: dev {given['metric']} with no fine-tuning "
              f"(input model {given['dev']:.4f}; {given['dev_examples']} dev rows)\n")
        by = defaultdict(dict)
        for r in results:
            by[r["ratio"], r["set"]][r["method"]] = r
        print("| ratio | module type | " + " | ".join(METHODS) + " | winner |")
        print("| ---: | --- | " + " | ".join("---:" for _ in METHODS) + " | --- |")
        for ratio in sorted({k[0] for k in by}):
            for name in SETS:
                found = by.get((ratio, name))
                if not found:
                    continue
                cells = [f"{found[m]['dev']:.4f}" if m in found else "" for m in METHODS]
                best = max(found.values(), key=lambda r: r["dev"])
                ties = [m for m in METHODS if m in found and
                        abs(found[m]["dev"] - best["dev"]) < 1e-9]
                print(f"| {ratio:g} | {name} | " + " | ".join(cells) + f" | {', '.join(ties)} |")
        print()
        print("Whole model, all six encoder module types compressed (parameters as loaded; "
              "stored = the safetensors on disk, codes included; latency = PyTorch, batch 32, "
              "median of 20, interleaved with the input model):\n")
        print("| ratio | method | dev | parameters | stored MB | latency ms |")
        print("| ---: | --- | ---: | ---: | ---: | ---: |")
        base_latency = latency.get("input", {}).get("median_ms")
        print(f"| 1 | input | {given['dev']:.4f} | {given['parameters']:,} | "
              f"{given['stored_bytes'] / 1e6:.1f} | "
              f"{f'{base_latency:.1f}' if base_latency else ''} |")
        for r in sorted((r for r in results if r["set"] == "all"),
                        key=lambda r: (r["ratio"], METHODS.index(r["method"]))):
            timed = latency.get(f"{r['method']}-{r['ratio']:g}", {}).get("median_ms")
            print(f"| {r['ratio']:g} | {r['method']} | {r['dev']:.4f} | {r['parameters']:,} | "
                  f"{r['stored_bytes'] / 1e6:.1f} | {f'{timed:.1f}' if timed else ''} |")
        print()


def spread(paths: list[str]) -> None:
    import statistics

    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    given = [r for r in rows if r.get("method") == "input"]
    results = [r for r in rows if r.get("method") in METHODS]
    teachers = sorted({r["teacher"] for r in given})

    def cell(values: list[float]) -> str:
        if len(values) < 2:
            return f"{values[0]:.4f}" if values else ""
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    inputs = [r["dev"] for r in given]
    print(f"### {given[0]['task']}: mean ± std over {len(teachers)} teachers (input models "
          f"{cell(inputs)})\n")
    print("| ratio | module type | " + " | ".join(METHODS) + " | best mean |")
    print("| ---: | --- | " + " | ".join("---:" for _ in METHODS) + " | --- |")
    ratios = sorted({r["ratio"] for r in results if
                     len({x["teacher"] for x in results if x["ratio"] == r["ratio"]}) > 1})
    for ratio in ratios:
        for name in SETS:
            values = {m: [r["dev"] for r in results if r["ratio"] == ratio and
                          r["set"] == name and r["method"] == m] for m in METHODS}
            if not any(values.values()):
                continue
            means = {m: statistics.mean(v) for m, v in values.items() if v}
            best = max(means, key=means.get)
            print(f"| {ratio:g} | {name} | " + " | ".join(cell(values[m]) for m in METHODS)
                  + f" | {best} |")
    print()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--spread"]:
        spread(sys.argv[2:])
    else:
        main(sys.argv[1:])
