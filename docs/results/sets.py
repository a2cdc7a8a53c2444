"""Per removed-layer set: the selection score the search saw and the dev score of the finals.

The report pools what a strategy chose; this lists every set that was fine-tuned, so you
can see whether the selection split ranked the sets the way the dev set does. It reads
the Parquet tables of a run home (default: run.sh's ``.glp-results``), the rows of the
task's latest job (the last ``glp compare`` run for it).

Usage: python docs/results/sets.py TASK [HOME]
Example: python docs/results/sets.py cola
"""

import sys

import pandas as pd
import pyarrow.dataset as ds


def _table(home: str, name: str, task: str) -> pd.DataFrame:
    frame = ds.dataset(f"{home}/parquet/{name}").to_table().to_pandas()
    frame = frame[frame["task"] == task].copy()
    frame["set"] = frame["removed"].apply(lambda r: "{" + ",".join(map(str, sorted(r))) + "}")
    return frame


def main(task: str, home: str = ".glp-results") -> None:
    finals = _table(home, "finals", task)
    if finals.empty:
        sys.exit(f"no final models for task '{task}' in {home}/parquet/finals")
    job = finals.sort_values("recorded_at")["job_id"].iloc[-1]
    finals = finals[finals["job_id"] == job]
    candidates = _table(home, "candidates", task)
    candidates = candidates[candidates["job_id"] == job]
    # One selection score per set (a set shared by strategies was fine-tuned once);
    # one dev score per set and seed (a final shared by jobs is the same cached model).
    selection = candidates.drop_duplicates("cache_key").groupby("set")["value"].first()
    dev = finals.drop_duplicates("cache_key").groupby("set")["value"].agg(["mean", "std", "count"])
    table = dev.join(selection.rename("selection"), how="outer")
    table["count"] = table["count"].astype("Int64")
    table.insert(0, "removed", table.index.str.count(",") + (table.index != "{}"))
    table = table.sort_values(["removed", "mean"], ascending=[True, False])
    print(f"{task} (job {job}): dev {finals['metric'].iloc[0]} per removed set "
          "(mean, std, seeds) and selection score")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main(*sys.argv[1:])
