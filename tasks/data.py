"""Prepare a task's data once per run: load, limit, split, and save the splits to the run home.

Every later task reads a split from disk by path, so tasks stay small to pass around
(also to a Dask or Ray worker that shares the run home) and the cache keys hold the
splits' content fingerprints, not the rows.
"""

from __future__ import annotations

import datasets
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from glp import GlpError
from glp.training.data import (
    TaskData,
    check_labels,
    check_selection,
    fingerprint,
    get_task,
    limit_examples,
    load_glue_task,
    load_user_data,
    split_for_selection,
)
from tasks import faults
from tasks.home import RunHome

SPLITS = ("train", "fit", "selection", "dev")
"""train: the (limited) training set, for the final models; fit/selection: its 85/15
split for the search; dev: the task's dev set, for the final report only."""


class DataSource(BaseModel, frozen=True):
    """Where a task's rows come from: a GLUE task name, or the user's files or dataset id."""

    task: str | None = None
    data_dir: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    task_type: str = "classification"
    metric: str | None = None
    name: str = "custom"


class DataRef(BaseModel, frozen=True):
    """Prepared splits on disk, with what the tasks need to know about the task."""

    task: str
    metric: str
    is_regression: bool
    num_labels: int
    label_names: tuple[str, ...] | None
    paths: dict[str, str]
    fingerprints: dict[str, str]
    sizes: dict[str, int]

    def load(self, split: str) -> datasets.Dataset:
        """A split as an in-memory dataset."""
        if split not in self.paths:
            raise GlpError(f"unknown split '{split}'; choose one of: {', '.join(self.paths)}")
        return read_split(self.paths[split])


def is_pair(data: DataRef) -> bool:
    """Whether the task's rows are sentence pairs (its prepared dev split has ``text_b``)."""
    return "text_b" in pq.read_schema(data.paths["dev"]).names


def read_split(path: str) -> datasets.Dataset:
    """A prepared split (a Parquet file in the run home) as an in-memory dataset."""
    return datasets.Dataset(pq.read_table(path))


def load_source(source: DataSource) -> TaskData:
    """Read the rows a source names (GLUE folder, file, or ``datasets`` id).

    Raises GlpError when the source has no dev split: the final report needs one.
    """
    data = _read_source(source)
    if data.dev is None:
        raise GlpError("the data has no dev split: give --dev-file for the final evaluation")
    return data


def _read_source(source: DataSource) -> TaskData:
    if source.train_file:
        if not source.text_columns:
            raise GlpError("--text-column is required with --train-file (one or two columns)")
        return load_user_data(
            source.train_file,
            source.dev_file,
            text_columns=source.text_columns,
            label_column=source.label_column,
            task_type=source.task_type,
            metric=source.metric,
            name=source.name,
        )
    if not source.task:
        raise GlpError("name a GLUE task (--task) or a training file (--train-file)")
    if not source.data_dir:
        raise GlpError("a GLUE task needs the folder of GLUE files (--data-dir)")
    get_task(source.task)  # a clear error for an unknown name before touching files
    return load_glue_task(source.task, source.data_dir)


def checked_train(data: TaskData, train_limit: int | None, split_seed: int,
                  selection_fraction: float) -> tuple[datasets.Dataset, list[str]]:
    """The training rows a run uses (``train_limit`` of them, deterministically), after
    checking that a model can learn them and be judged on the dev rows (glp.training.data's
    ``check_labels``), and that they leave a selection split worth the name
    (``check_selection``); with the warnings about that split."""
    train = limit_examples(data.train, train_limit, seed=split_seed)
    check_labels(train, data.dev, data.spec, limited=train_limit is not None)
    notes = check_selection(train, selection_fraction, split_seed, data.spec,
                            limited=train_limit is not None)
    return train, notes


@task(name="prepare-data", cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=faults.retry_unless_hopeless)
def prepare_data(
    source: DataSource,
    home: RunHome,
    train_limit: int | None,
    eval_limit: int | None,
    selection_fraction: float,
    split_seed: int,
) -> DataRef:
    """Load, limit, split (85/15, deterministic) and write the splits as Parquet.

    Cheap and deterministic, so not cached; ``prepare_data.fn`` runs it without Prefect.
    """
    data = load_source(source)
    # Checked here too, not only in the CLI: a deployment or a direct flow call gets it.
    train, _ = checked_train(data, train_limit, split_seed, selection_fraction)
    fit, selection = split_for_selection(train, selection_fraction, seed=split_seed,
                                         by=None if data.spec.is_regression else "label")
    dev = limit_examples(data.dev, eval_limit, seed=split_seed)
    splits = {"train": train, "fit": fit, "selection": selection, "dev": dev}
    prints = {name: fingerprint(ds) for name, ds in splits.items()}
    paths = {}
    for name, ds in splits.items():
        path = home.data / f"{name}-{prints[name]}.parquet"
        if not path.exists():  # content-addressed: an existing file holds the same rows
            tmp = path.with_suffix(".tmp")
            # flatten_indices: a subset is a view (an indices mapping) over the full table.
            pq.write_table(ds.flatten_indices().data.table, tmp)
            tmp.replace(path)
        paths[name] = str(path)
    spec = data.spec
    return DataRef(
        task=spec.name,
        metric=spec.metric,
        is_regression=spec.is_regression,
        num_labels=spec.num_labels,
        label_names=spec.label_names,
        paths=paths,
        fingerprints=prints,
        sizes={name: len(ds) for name, ds in splits.items()},
    )
