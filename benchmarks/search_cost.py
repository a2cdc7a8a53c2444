"""The cheaper greedy searches against the full one: cost, agreement and final scores.

For each task, at the budget docs/results uses for it, the same greedy search (MiniLM, 2 of
6 layers removed, search seed 41) four ways, in one run home so that every variant shares
the others' cached fine-tunes (a reused fine-tune still counts what it cost when it was
computed):

- ``full``: the reference protocol, every candidate fine-tuned for the whole budget;
- ``halving``: successive halving from 0.1 of the budget (``--search halving``);
- ``warm``: candidates repaired for 0.25 of the budget from one fine-tuned full model
  (``--search warm``, a variant of the protocol);
- ``prefilter-3``: only the 3 lowest-block-influence candidates fine-tuned
  (``--prefilter-keep 3``).

Each variant's final models (every depth, 3 seeds, the whole training subset, scored on
dev) follow the same protocol; where two variants chose the same layers they share them.

Reported per task and variant: the search's fine-tunes, its cost in whole-budget
equivalents and in fine-tune + evaluation seconds (both as a ratio to the full search),
the removal order and how many of its choices agree with the full search's, and the dev
score of every depth (mean ± std over the seeds).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/search_cost.py [--tasks sst2,cola,mrpc]
           [--variants full,halving,warm,prefilter-3] [--home DIR]
           [--out docs/benchmarks/search_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# The budgets of docs/results/run.sh: train examples, max length, batch, lr, epochs.
BUDGETS = {
    "sst2": (2000, 64, 32, 1e-4, 1.0),
    "cola": (2000, 64, 32, 1e-4, 3.0),
    "stsb": (2000, 128, 8, 5e-5, 1.0),
    "mrpc": (1000, 128, 8, 1e-4, 1.0),
    "rte": (1000, 128, 8, 1e-4, 1.0),
}
VARIANTS = {
    "full": {},
    "halving": {"search": "halving"},
    "warm": {"search": "warm"},
    "prefilter-3": {"prefilter_keep": 3},
}
REMOVE, SEEDS = 2, 3


def run_task(task: str, home: Path, variants: list[str]) -> dict:
    from flows.prune import PruneParams, prune

    limit, length, batch, lr, epochs = BUDGETS[task]
    results = {}
    for name in variants:
        options = VARIANTS[name]
        params = PruneParams(task=task, remove=REMOVE, train_limit=limit, max_length=length,
                             batch_size=batch, learning_rate=lr, epochs=epochs, seeds=SEEDS,
                             register_models=False, home=str(home), **options)
        started = time.perf_counter()
        summary = prune(params)
        wall = time.perf_counter() - started
        finals: dict[int, list[float]] = {}
        for row in summary.finals:
            finals.setdefault(row["depth"], []).append(row["value"])
        results[name] = {
            "order": summary.order, "fine_tunes": summary.search_fine_tunes,
            "equivalents": summary.search_equivalents, "seconds": summary.search_seconds,
            "wall_seconds": round(wall, 1), "computed": summary.computed,
            "reused": summary.reused, "metric": summary.metric,
            "finals": {str(d): v for d, v in sorted(finals.items(), reverse=True)},
        }
        print(f"{task} {name}: order {summary.order}, {summary.search_equivalents:g} "
              f"equivalents, {summary.search_seconds:.0f} s of search, wall {wall:.0f} s",
              flush=True)
    return results


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def table(task: str, results: dict) -> str:
    full = results["full"]
    depths = list(full["finals"])
    lines = [f"{task} (dev {full['metric']}, {SEEDS} seeds)", "",
             "| search | fine-tunes | equivalents | of full | search s | of full | order | "
             "agrees | " + " | ".join(f"depth {d}" for d in depths) + " |",
             "| --- |" + " ---: |" * 5 + " --- | ---: |" + " ---: |" * len(depths)]
    for name, result in results.items():
        agrees = sum(a == b for a, b in zip(result["order"], full["order"], strict=True))
        lines.append(
            f"| {name} | {result['fine_tunes']} | {result['equivalents']:g} | "
            f"{result['equivalents'] / full['equivalents']:.0%} | {result['seconds']:.0f} | "
            f"{result['seconds'] / full['seconds']:.0%} | "
            f"{' → '.join(map(str, result['order']))} | {agrees}/{len(full['order'])} | "
            + " | ".join(_mean_std(result["finals"][d]) for d in depths) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,cola,mrpc")
    parser.add_argument("--home", default=".glp-search-bench")
    parser.add_argument("--out", default="docs/benchmarks/search_cost.json")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="which of: " + ", ".join(VARIANTS) + " (full first)")
    args = parser.parse_args()
    from tasks.home import RunHome, configure_environment

    home = Path(args.home).resolve()
    configure_environment(RunHome.resolve(str(home)).create())
    os.environ.setdefault("GLP_HOME", str(home))
    out = Path(args.out)
    found = json.loads(out.read_text()) if out.exists() else {}
    for task in args.tasks.split(","):
        started = time.perf_counter()
        found[task] = run_task(task, home, args.variants.split(","))
        found[task]["_seconds"] = round(time.perf_counter() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(found, indent=1) + "\n")
    for task, results in found.items():
        print()
        print(table(task, {k: v for k, v in results.items() if not k.startswith("_")}))


if __name__ == "__main__":
    main()
