"""distill.md: per depth, the plain and the distilled fine-tune against the unpruned model.

Reads the newest ``glp prune --distill`` job of a task in a run home's parquet/finals.
Usage: .venv/bin/python docs/results/methods/distill.py HOME TASK > distill.md
"""

from __future__ import annotations

import statistics
import sys

import pyarrow.dataset as ds

from tasks.records import FINALS


def main(home: str, task: str) -> None:
    rows = [r for r in ds.dataset(f"{home}/parquet/finals", schema=FINALS).to_table().to_pylist()
            if r["task"] == task and r["method"] in ("layers", "unpruned")]
    jobs = {r["job_id"] for r in rows if r["distilled"]}
    if not jobs:
        sys.exit(f"no distilled rows of {task} in {home}")
    job = max(jobs, key=lambda j: max(r["recorded_at"] for r in rows if r["job_id"] == j))
    mine = [r for r in rows if r["job_id"] == job and not r["diverged"]]
    metric = mine[0]["metric"]

    def stats(group):
        values = [r["value"] for r in group]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.mean(values), spread, len(values)

    ref = stats([r for r in mine if r["strategy"] == "unpruned"])
    print(f"# Distillation for layer-pruned models: {task}, dev {metric}\n")
    print(f"Job {job}; unpruned {ref[0]:.4f} ± {ref[1]:.4f} ({ref[2]} seeds). \"gap closed\": "
          "the share of the plain model's gap to the unpruned one that distillation "
          "recovers (negative: it widened), shown only where the gap is larger than the two "
          "seed spreads added.\n")
    print("| layers | removed | plain | distilled | difference | gap closed |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for depth in sorted({r["depth"] for r in mine if r["strategy"] != "unpruned"}, reverse=True):
        at = [r for r in mine if r["depth"] == depth and r["strategy"] != "unpruned"]
        plain = stats([r for r in at if not r["distilled"]])
        kd_rows = [r for r in at if r["distilled"]]
        if not kd_rows:
            print(f"| {depth} | | {plain[0]:.4f} ± {plain[1]:.4f} | every seed diverged | | |")
            continue
        kd = stats(kd_rows)
        gap = ref[0] - plain[0]
        # A gap smaller than the two seed spreads added is no gap to close: a share of it
        # would be noise (CoLA's 4 layers: a gap of 0.0013 and spreads of 0.02).
        closed = (f"{(kd[0] - plain[0]) / gap:.0%}" if gap > ref[1] + plain[1] else
                  "— (no gap)" if gap <= 0 else "— (gap within the seed spread)")
        removed = ",".join(map(str, at[0]["removed"]))
        print(f"| {depth} | {removed} | {plain[0]:.4f} ± {plain[1]:.4f} | "
              f"{kd[0]:.4f} ± {kd[1]:.4f} | {kd[0] - plain[0]:+.4f} | {closed} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
