"""Task data: GLUE and user datasets, normalised, subset, split, fingerprinted and tokenised.

Every loader returns the same normalised shape, so the rest of the pipeline never sees a
source file's quirks: a ``datasets.Dataset`` with ``text_a`` (str), ``text_b`` (str, pair
tasks only) and ``label`` (int64 class index, or float32 for regression).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pandas as pd

from glp.core.errors import GlpError, ParamError
from glp.core.hashing import stable_hash
from glp.training.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "GLUE_TASKS",
    "SUPPORTED_EXTENSIONS",
    "TaskData",
    "TaskSpec",
    "collate",
    "fingerprint",
    "get_task",
    "limit_examples",
    "load_glue_split",
    "load_glue_task",
    "load_user_data",
    "split_for_selection",
    "check_selection",
    "MIN_SELECTION",
    "tokenize",
]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its text and label columns, classes, selection metric and file layout.

    Attributes:
        name: canonical lowercase name (``sst2``, ``mrpc``, ... or a user's name).
        text_columns: one or two source column names (two for sentence-pair tasks).
        label_column: the source label column.
        label_names: source label values in class-index order; None for regression.
        metric: the metric that selects layers ("accuracy", "f1", "mcc", "pearson",
            "spearman"); higher is better.
        folder: the GLUE sub-folder (``SST-2``); None for user data.
        train_file: the training file name inside ``folder``.
        dev_file: the evaluation file name inside ``folder``.
        column_names: names for a headerless file (CoLA); None when the file has a header.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    metric: str
    folder: str | None = None
    train_file: str | None = "train.tsv"
    dev_file: str | None = "dev.tsv"
    column_names: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        """True when the label is a real number (STS-B) rather than a class."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Output units of the classification head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (the dataset then has a ``text_b`` column)."""
        return len(self.text_columns) == 2


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

# Selection metrics follow the paper: F1 for MRPC and QQP, Spearman for STS-B,
# MCC for CoLA, accuracy for the rest.
GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        "cola",
        ("sentence",),
        "label",
        _BINARY,
        "mcc",
        folder="CoLA",
        # CoLA is the raw corpus file: no header, the third column is the author's mark.
        column_names=("source", "label", "original_label", "sentence"),
    ),
    "mnli": TaskSpec(
        "mnli",
        ("sentence1", "sentence2"),
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        "accuracy",
        folder="MNLI",
        dev_file="dev_matched.tsv",
    ),
    "mrpc": TaskSpec("mrpc", ("#1 String", "#2 String"), "Quality", _BINARY, "f1", folder="MRPC"),
    "qnli": TaskSpec("qnli", ("question", "sentence"), "label", _NLI2, "accuracy", folder="QNLI"),
    "qqp": TaskSpec("qqp", ("question1", "question2"), "is_duplicate", _BINARY, "f1", folder="QQP"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), "label", _NLI2, "accuracy", folder="RTE"),
    "sst2": TaskSpec("sst2", ("sentence",), "label", _BINARY, "accuracy", folder="SST-2"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), "score", None, "spearman", folder="STS-B"),
}


@dataclass(frozen=True)
class TaskData:
    """A task's normalised data.

    Attributes:
        spec: the task's description (for user data, with ``label_names`` filled in).
        train: normalised training rows.
        dev: normalised evaluation rows, or None when the source has none.
    """

    spec: TaskSpec
    train: datasets.Dataset
    dev: datasets.Dataset | None


def _normalise_name(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


def get_task(name: str) -> TaskSpec:
    """Look up a GLUE task by name, ignoring case, '-' and '_' ("SST-2" == "sst2").

    Args:
        name: the task name.

    Returns:
        The task's spec.

    Raises:
        GlpError: the name is not a GLUE task; the message lists the valid names.
    """
    key = _normalise_name(str(name))
    if key not in GLUE_TASKS:
        raise GlpError(f"unknown task {name!r}; choose one of: {', '.join(sorted(GLUE_TASKS))}")
    return GLUE_TASKS[key]


# --------------------------------------------------------------------------- normalising


def _features(is_pair: bool, is_regression: bool) -> datasets.Features:
    cols = {"text_a": datasets.Value("string")}
    if is_pair:
        cols["text_b"] = datasets.Value("string")
    cols["label"] = datasets.Value("float32" if is_regression else "int64")
    return datasets.Features(cols)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    # Short (malformed) GLUE lines are padded with empty strings; an empty text or label
    # is as unusable as a missing one.
    return isinstance(value, str) and not value.strip()


def _check_columns(df: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    for col in columns:
        if col not in df.columns:
            have = ", ".join(str(c) for c in df.columns)
            raise GlpError(f"column {col!r} not found in {source}; columns are: {have}")


def _drop_missing(df: pd.DataFrame, columns: Sequence[str], source: str) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for col in columns:
        mask &= ~np.fromiter((_is_missing(v) for v in df[col]), dtype=bool, count=len(df))
    dropped = int(len(df) - mask.sum())
    if dropped:
        logger.warning("%s: dropped %d rows with a missing text or label", source, dropped)
    return df[mask]


def _to_dataset(
    texts: Sequence[Sequence[str]], labels: Sequence[Any], *, is_regression: bool
) -> datasets.Dataset:
    data: dict[str, Any] = {"text_a": list(texts[0])}
    if len(texts) == 2:
        data["text_b"] = list(texts[1])
    data["label"] = list(labels)
    return datasets.Dataset.from_dict(
        data, features=_features(len(texts) == 2, is_regression=is_regression)
    )


def _float_labels(values: Sequence[Any], column: str, source: str) -> list[float]:
    out = []
    for row, v in enumerate(values, start=1):
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise GlpError(
                f"label {v!r} in column {column!r} of {source} is not a number; "
                "a regression task needs numeric labels"
            ) from None
        if not math.isfinite(value):
            # A NaN or inf target turns every weight NaN at the first step.
            raise GlpError(
                f"label {v!r} in column {column!r} of {source} (data row {row}) is not a "
                "finite number; a regression task needs finite labels (drop or fix that row)"
            )
        out.append(value)
    return out


def check_labels(train: datasets.Dataset, dev: datasets.Dataset | None, spec: TaskSpec,
                 limited: bool = False) -> None:
    """Refuse classification data a model cannot learn or be judged on honestly.

    The training rows must hold at least two classes, and every class of the dev rows
    must occur in the training rows: a head output that never trained would be scored
    (and registered) as if it had.

    Args:
        train: the training rows that will be used (after any ``--train-limit``).
        dev: the dev rows, or None.
        spec: the task (regression tasks are not checked).
        limited: whether ``train`` is a ``--train-limit`` subset (said in the message).

    Raises:
        GlpError: fewer than two training classes, or dev classes missing from training.
    """
    if spec.is_regression or spec.label_names is None:
        return
    names = spec.label_names
    subset = " (the --train-limit subset)" if limited else ""
    where = spec.train_file if spec.folder is None else f"{spec.folder}/{spec.train_file}"
    seen = set(train["label"])
    if len(seen) < 2:
        only = ", ".join(repr(names[i]) for i in sorted(seen)) or "none"
        raise GlpError(
            f"the training data {where}{subset} holds one class ({only}); a classifier needs "
            "at least two"
        )
    if dev is not None:
        missing = sorted(set(dev["label"]) - seen)
        if missing:
            dev_where = spec.dev_file if spec.folder is None else f"{spec.folder}/{spec.dev_file}"
            count = sum(1 for label in dev["label"] if label in set(missing))
            raise GlpError(
                f"dev label(s) {', '.join(repr(names[i]) for i in missing)} in {dev_where} "
                f"({count} row(s)) never occur in the training data {where}{subset}; the model "
                "could never predict them: remove those rows or add training examples"
            )


# --------------------------------------------------------------------------- GLUE


def _read_glue_tsv(path: Path, spec: TaskSpec) -> pd.DataFrame:
    return pd.read_csv(
        path,
        sep="\t",
        quoting=csv.QUOTE_NONE,  # GLUE text has bare quotes; csv quoting would merge lines
        encoding="utf-8-sig",  # strips MRPC's byte-order mark from the first column name
        header=None if spec.column_names else "infer",
        names=list(spec.column_names) if spec.column_names else None,
        dtype=str,
        # Keep texts like "NA" or "null" as text; missing values are handled explicitly.
        na_filter=False,
        on_bad_lines="skip",  # QQP/MNLI have a few malformed lines
    )


def _glue_split(spec: TaskSpec, path: Path) -> datasets.Dataset:
    df = _read_glue_tsv(path, spec)
    _check_columns(df, (*spec.text_columns, spec.label_column), str(path))
    df = _drop_missing(df, (*spec.text_columns, spec.label_column), str(path))
    texts = [df[c].tolist() for c in spec.text_columns]
    raw = df[spec.label_column].str.strip().tolist()
    if spec.label_names is None:
        labels: list[Any] = _float_labels(raw, spec.label_column, str(path))
    else:
        index = {name: i for i, name in enumerate(spec.label_names)}
        bad = next((v for v in raw if v not in index), None)
        if bad is not None:
            raise GlpError(
                f"unexpected label {bad!r} in {path} (column {spec.label_column!r}); "
                f"expected one of: {', '.join(spec.label_names)}"
            )
        labels = [index[v] for v in raw]
    return _to_dataset(texts, labels, is_regression=spec.is_regression)


def _glue_folder(spec: TaskSpec, data_dir: str | Path) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise GlpError(
            f"GLUE data directory {str(root)!r} does not exist; expected a folder holding "
            f"the GLUE task folders (e.g. {spec.folder}/{spec.train_file})"
        )
    folder = root / str(spec.folder)
    if not folder.is_dir():
        raise GlpError(
            f"no {spec.folder} folder in {str(root)!r}; expected {folder / str(spec.train_file)} "
            f"and {folder / str(spec.dev_file)} (the standard GLUE layout)"
        )
    return folder


def load_glue_split(name: str, data_dir: str | Path, split: str = "dev") -> datasets.Dataset:
    """Load one split of a GLUE task (e.g. QNLI dev, whose train file is not bundled).

    Args:
        name: the task name (any spelling ``get_task`` accepts).
        data_dir: the folder holding the GLUE task folders (``SST-2``, ``MRPC``, ...).
        split: "train" or "dev".

    Returns:
        The normalised split.

    Raises:
        GlpError: unknown task or split, missing folder or file, or a label outside the
            task's classes.
    """
    spec = get_task(name)
    files = {"train": spec.train_file, "dev": spec.dev_file}
    if split not in files:
        raise GlpError(f"unknown split {split!r}; choose one of: train, dev")
    folder = _glue_folder(spec, data_dir)
    file_name = str(files[split])
    path = folder / file_name
    if not path.is_file():
        hint = ""
        if spec.name == "qnli" and split == "train":
            hint = (
                " (the bundled GLUE data ships QNLI dev.tsv only: QNLI train is too large; "
                "download GLUE's QNLI/train.tsv to use it)"
            )
        raise GlpError(
            f"{spec.name} {split} file not found: {str(path)!r}; expected the GLUE "
            f"{spec.folder}/{file_name}{hint}"
        )
    return _glue_split(spec, path)


def load_glue_task(name: str, data_dir: str | Path) -> TaskData:
    """Load a GLUE task from the standard ``<data_dir>/<Folder>/{train,dev}.tsv`` layout.

    MNLI's dev set is ``dev_matched.tsv``.

    Args:
        name: the task name (any spelling ``get_task`` accepts).
        data_dir: the folder holding the GLUE task folders (``SST-2``, ``MRPC``, ...).

    Returns:
        The normalised train and dev sets.

    Raises:
        GlpError: unknown task, missing folder or file, or a label outside the task's classes.
    """
    spec = get_task(name)
    train = load_glue_split(spec.name, data_dir, "train")
    dev = load_glue_split(spec.name, data_dir, "dev")
    return TaskData(spec=spec, train=train, dev=dev)


# --------------------------------------------------------------------------- user data

# Hub ids look like "name" or "owner/name"; anything with a file suffix is taken as a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_file(source: str) -> bool:
    path = Path(source)
    return path.exists() or bool(re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,7}", path.suffix))


def _read_file(path: Path, option: str = "data file") -> pd.DataFrame:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise GlpError(
            f"{option} {str(path)!r}: unsupported file type {ext or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}, or a datasets id"
        )
    if not path.is_file():
        raise GlpError(f"{option} {str(path)!r}: no such file")
    try:
        if ext == ".csv":
            return pd.read_csv(path, keep_default_na=False, na_values=[""])
        if ext == ".tsv":
            return pd.read_csv(
                path,
                sep="\t",
                quoting=csv.QUOTE_NONE,
                encoding="utf-8-sig",
                keep_default_na=False,
                na_values=[""],
                on_bad_lines="skip",
            )
        if ext == ".jsonl":
            return pd.read_json(path, lines=True)
        if ext == ".json":
            try:
                return pd.read_json(path)
            except ValueError:
                # HF-style ".json" files are often JSON lines.
                return pd.read_json(path, lines=True)
        return pd.read_parquet(path)
    except GlpError:
        raise
    except Exception as exc:  # pandas raises many types; the user needs the file named
        raise GlpError(f"could not read {str(path)!r} as {ext}: {exc}") from exc


def _load_hub(hub_id: str, config: str | None) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(hub_id, config)
    except Exception as exc:  # network, unknown id, missing config: all user-facing
        where = f" (config {config!r})" if config else ""
        raise GlpError(
            f"could not load dataset {hub_id!r}{where} with datasets.load_dataset: {exc}; "
            f"pass a path to a {'/'.join(SUPPORTED_EXTENSIONS)} file or a valid hub id"
        ) from exc


def _is_hub_id(source: str | Path) -> bool:
    if isinstance(source, Path):
        return False
    text = str(source)
    return not _looks_like_file(text) and bool(_HUB_ID.match(text))


_Frame = tuple[pd.DataFrame, Any, str]  # rows, hub features (or None), source name


def _user_frame(
    source: str | Path, split: str, hub: dict[str, datasets.DatasetDict], config: str | None
) -> _Frame:
    if not _is_hub_id(source):
        path = Path(source).expanduser()
        option = "--train-file" if split == "train" else "--dev-file"
        return _read_file(path, option), None, path.name
    text = str(source)
    if text not in hub:
        hub[text] = _load_hub(text, config)
    dsd = hub[text]
    if split not in dsd:
        raise GlpError(
            f"dataset {text!r} has no {split!r} split; splits are: {', '.join(dsd.keys())}"
        )
    return dsd[split].to_pandas(), dsd[split].features, f"{text}[{split}]"


def _label_index(values: Sequence[Any]) -> tuple[tuple[str, ...], dict[Any, int]]:
    uniq = set(values)
    # Integer labels keep numeric order (so 0/1 stay 0/1, and 2 sorts before 10);
    # anything else is ordered by its text.
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in uniq):
        ordered = sorted(uniq, key=int)
    else:
        ordered = sorted(uniq, key=str)
    return tuple(str(v) for v in ordered), {v: i for i, v in enumerate(ordered)}


def _clean_labels(values: list[Any]) -> list[Any]:
    # CSV readers turn an int column with gaps into floats; 1.0 is the class "1".
    out = []
    for v in values:
        if isinstance(v, float | np.floating) and float(v).is_integer():
            v = int(v)
        elif isinstance(v, np.integer):
            v = int(v)
        elif isinstance(v, np.bool_):
            v = bool(v)
        out.append(v)
    return out


def _class_label_ids(values: Sequence[Any], names: tuple[str, ...], source: str) -> list[int]:
    # Hub ClassLabel columns hold indices already; a file paired with a hub split may
    # hold the class names instead.
    index = {name: i for i, name in enumerate(names)}
    out = []
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
            out.append(v)
        elif str(v) in index:
            out.append(index[str(v)])
        else:
            raise GlpError(
                f"unexpected label {v!r} in {source}; expected one of: {', '.join(names)} "
                f"(or their indices 0-{len(names) - 1})"
            )
    return out


def load_user_data(
    train: str | Path,
    dev: str | Path | None = None,
    *,
    text_columns: str | Sequence[str],
    label_column: str,
    task_type: str = "classification",
    metric: str | None = None,
    name: str = "custom",
    dataset_config: str | None = None,
) -> TaskData:
    """Load a user's task from files or a ``datasets`` hub id.

    String (or any non-integer) class labels become indices in sorted order, integer labels
    in numeric order; ``spec.label_names`` records the source values. The classes are the
    union of train and dev labels, so a dev-only class still has an index.

    Args:
        train: a .csv/.tsv/.json/.jsonl/.parquet file, or a hub id (its "train" split).
        dev: a file or hub id for evaluation. None: the hub dataset's "validation" split
            when ``train`` is a hub id and has one, else no dev set.
        text_columns: one column name, or two for a sentence-pair task.
        label_column: the label column.
        task_type: "classification" or "regression".
        metric: the selection metric; default accuracy (classification) or spearman
            (regression).
        name: the task's name in specs and reports.
        dataset_config: the hub dataset's configuration name, if it has several.

    Returns:
        The normalised train and dev sets and a spec describing them.

    Raises:
        GlpError: missing file, unsupported extension, hub load failure, missing column,
            bad task type or metric, non-numeric regression labels, or no usable rows.
    """
    if task_type not in ("classification", "regression"):
        raise ParamError("task_type", repr(task_type), "one of: classification, regression")
    is_regression = task_type == "regression"
    valid = REGRESSION_METRICS if is_regression else CLASSIFICATION_METRICS
    metric = metric or ("spearman" if is_regression else "accuracy")
    if metric not in valid:
        raise ParamError("metric", repr(metric), f"a {task_type} metric, one of: "
                         f"{', '.join(valid)}")
    cols = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if len(cols) not in (1, 2):
        raise GlpError(f"--text-column must be given once (one text) or twice (a pair), got "
                       f"{len(cols)}: {', '.join(cols)}")

    hub: dict[str, datasets.DatasetDict] = {}  # each hub dataset is loaded once
    frames: dict[str, _Frame] = {"train": _user_frame(train, "train", hub, dataset_config)}
    if dev is not None:
        frames["dev"] = _user_frame(dev, "validation", hub, dataset_config)
    elif str(train) in hub and "validation" in hub[str(train)]:
        frames["dev"] = _user_frame(train, "validation", hub, dataset_config)

    texts: dict[str, list[list[str]]] = {}
    raw: dict[str, list[Any]] = {}
    class_names: tuple[str, ...] | None = None
    for split, (df, features, source) in frames.items():
        _check_columns(df, (*cols, label_column), source)
        df = _drop_missing(df, (*cols, label_column), source)
        if len(df) == 0:
            raise GlpError(f"{source} has no rows with both text and {label_column!r}")
        texts[split] = [[str(v) for v in df[c]] for c in cols]
        raw[split] = _clean_labels(df[label_column].tolist())
        feature = features[label_column] if features is not None else None
        if isinstance(feature, datasets.ClassLabel) and not is_regression:
            class_names = tuple(feature.names)  # hub class labels are already indices

    label_names: tuple[str, ...] | None = None
    labels: dict[str, list[Any]] = {}
    if is_regression:
        labels = {s: _float_labels(v, label_column, frames[s][2]) for s, v in raw.items()}
    elif class_names is not None:
        label_names = class_names
        labels = {s: _class_label_ids(v, class_names, frames[s][2]) for s, v in raw.items()}
    else:
        label_names, index = _label_index([v for vs in raw.values() for v in vs])
        labels = {s: [index[x] for x in v] for s, v in raw.items()}

    spec = TaskSpec(
        name=name,
        text_columns=cols,
        label_column=label_column,
        label_names=label_names,
        metric=metric,
        folder=None,
        train_file=frames["train"][2],
        dev_file=frames["dev"][2] if "dev" in frames else None,
    )
    built = {s: _to_dataset(texts[s], labels[s], is_regression=is_regression) for s in frames}
    return TaskData(spec=spec, train=built["train"], dev=built.get("dev"))


# --------------------------------------------------------------------------- subsets


def limit_examples(ds: datasets.Dataset, n: int | None, seed: int = 0) -> datasets.Dataset:
    """A deterministic random subset of ``n`` rows, kept in their original order.

    The same seed gives nested subsets for growing ``n``, so a larger limit only adds rows.

    Args:
        ds: the dataset.
        n: rows to keep; None (or at least ``len(ds)``) keeps all rows.
        seed: the random seed.

    Returns:
        The subset (``ds`` itself when all rows are kept).

    Raises:
        GlpError: ``n`` is below 1.
    """
    if n is None:
        return ds
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise GlpError(f"example limit must be a positive integer or None, got {n!r}")
    if n >= len(ds):
        return ds
    order = np.random.default_rng(seed).permutation(len(ds))
    return ds.select(np.sort(order[:n]).tolist())


MIN_SELECTION = 4
"""Fewest selection-split rows a search accepts: with fewer, one row decides between
candidates, and every candidate tends to tie."""


def selection_size(n: int, fraction: float) -> int:
    """Rows of an ``n``-row training set that the selection split gets (unstratified)."""
    return min(max(1, math.floor(n * fraction + 0.5)), n - 1)


def split_for_selection(
    ds: datasets.Dataset, fraction: float = 0.15, seed: int = 0, by: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split rows into a fit part and a selection part (the paper's 85/15 protocol).

    Args:
        ds: the training set.
        fraction: the share of rows that scores candidate layers, in (0, 1).
        seed: the random seed; the same input and seed give the same split.
        by: a column to stratify on (a classification task's ``label``): each value gets
            its share of the selection split, at least one row where it has two or more,
            so that a rare class is scored too. A value with one row stays in the fit part.

    Returns:
        ``(fit, selection)``: disjoint, together all rows, each in the original order.

    Raises:
        GlpError: ``fraction`` outside (0, 1), or too few rows for both parts.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise GlpError(f"selection fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    n = len(ds)
    if n < 2:
        raise GlpError(
            f"cannot split {n} row(s) into fit and selection parts; at least 2 rows are needed"
        )
    order = np.random.default_rng(seed).permutation(n)
    chosen: list[int] = []
    if by is not None:
        values = ds[by]
        groups: dict = {}
        for row in order.tolist():
            groups.setdefault(values[row], []).append(row)
        for rows in groups.values():
            if len(rows) >= 2:
                take = min(max(1, math.floor(len(rows) * fraction + 0.5)), len(rows) - 1)
                chosen += rows[:take]
    if not chosen or len(chosen) >= n:  # no stratum allows it: the plain split
        chosen = order[:selection_size(n, fraction)].tolist()
    picked = set(chosen)
    sel = sorted(picked)
    fit = [i for i in range(n) if i not in picked]
    return ds.select(fit), ds.select(sel)


def check_selection(train: datasets.Dataset, fraction: float, seed: int, spec: TaskSpec,
                    limited: bool = False) -> list[str]:
    """Refuse a training set too small for a selection split; warnings for the rest.

    Returns:
        One line per problem worth a warning: a class with no row in the selection split
        (it has a single training row).

    Raises:
        GlpError: the selection split would have fewer than :data:`MIN_SELECTION` rows.
    """
    n = len(train)
    by = None if spec.is_regression or spec.label_names is None else "label"
    selection = split_for_selection(train, fraction, seed, by=by)[1] if n >= 2 else []
    if len(selection) < MIN_SELECTION:
        subset = " (the --train-limit subset)" if limited else ""
        needed = math.ceil((MIN_SELECTION - 0.5) / fraction)
        raise GlpError(f"{n} training row(s){subset} leave {len(selection)} for the selection "
                       f"split (--selection-fraction {fraction:g}), which scores the "
                       f"candidates; it needs at least {MIN_SELECTION}: give at least {needed} "
                       "training rows")
    if by is None:
        return []
    counts: dict[int, int] = {}
    for label in train["label"]:
        counts[label] = counts.get(label, 0) + 1
    absent = sorted(set(counts) - set(selection["label"]))
    return [f"class {spec.label_names[label]!r} has {counts[label]} training row, so none "
            "in the selection split: candidates are not judged on it" for label in absent]


# --------------------------------------------------------------------------- fingerprint


def fingerprint(ds: datasets.Dataset) -> str:
    """A content hash (16 hex chars) of a dataset's rows.

    It hashes column names, types and values (with any ``select`` applied), never the
    ``datasets`` cache fingerprint, so it is stable across processes and cache states.

    Args:
        ds: the dataset.

    Returns:
        The hex digest.
    """
    table = ds.with_format("arrow")[:] if len(ds) else ds.data.table.slice(0, 0)
    h = hashlib.sha256()
    h.update(f"rows={table.num_rows}\n".encode())
    for name in table.column_names:
        column = table.column(name)
        h.update(f"{name}:{column.type}\n".encode())
        # JSON of the Python values is independent of Arrow chunking, offsets and buffers.
        payload = json.dumps(column.to_pylist(), ensure_ascii=False, separators=(",", ":"))
        h.update(payload.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- tokenising


def _tokenizer_key(tokenizer: Any) -> str:
    # Without an explicit key, the cache must still tell tokenizers apart: hash the full
    # fast-tokenizer definition (vocab, normaliser, special tokens) when there is one.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    return stable_hash(type(tokenizer).__name__, definition)


def tokenize(
    ds: datasets.Dataset,
    tokenizer: Any,
    *,
    max_length: int,
    cache_dir: str | Path | None = None,
    tokenizer_key: str = "",
) -> datasets.Dataset:
    """Tokenise a normalised dataset, truncating to ``max_length`` without padding.

    Padding is left to the training loop, which pads each batch to its longest row.

    Args:
        ds: a normalised dataset (``text_a``, optional ``text_b``, ``label``).
        tokenizer: a Hugging Face tokenizer.
        max_length: the maximum tokens per example (pairs are truncated longest-first).
        cache_dir: where the tokenised arrow file is cached; None keeps it in memory.
        tokenizer_key: names the tokenizer in the cache file name (e.g. the model id);
            empty derives one from the tokenizer's definition.

    Returns:
        A dataset with ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
        tokenizer makes them) and ``labels``.

    Raises:
        GlpError: ``max_length`` below 1, or ``ds`` lacks ``text_a``/``label``.
    """
    if max_length < 1:
        raise GlpError(f"max_length must be a positive integer, got {max_length!r}")
    for col in ("text_a", "label"):
        if col not in ds.column_names:
            raise GlpError(
                f"column {col!r} not found in the dataset to tokenise; columns are: "
                f"{', '.join(ds.column_names)}"
            )
    is_pair = "text_b" in ds.column_names
    probe = tokenizer("a", "b" if is_pair else None, truncation=True, max_length=max_length)
    model_inputs = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in probe]
    features = datasets.Features(
        {k: datasets.List(datasets.Value("int64")) for k in model_inputs}
        | {"labels": ds.features["label"]}
    )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(
            batch["text_a"],
            batch["text_b"] if is_pair else None,
            truncation=True,
            max_length=max_length,
            padding=False,
        )
        out = {k: enc[k] for k in model_inputs}
        out["labels"] = batch["label"]
        return out

    cache_file = None
    if cache_dir is not None:
        key = re.sub(r"[^\w.-]", "_", tokenizer_key or _tokenizer_key(tokenizer))
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file = str(Path(cache_dir) / f"{fingerprint(ds)}-{key}-{max_length}.arrow")
    return ds.map(
        encode,
        batched=True,
        remove_columns=ds.column_names,
        features=features,
        cache_file_name=cache_file,
        load_from_cache_file=cache_file is not None,
        keep_in_memory=cache_file is None,
        desc="tokenising",
    )


# --------------------------------------------------------------------------- batching

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@functools.cache
def _padding_collator(pad_id: int, with_attention_mask: bool) -> Any:
    # Padding needs only the padding token, not the model's vocabulary: the tokenizer
    # behind the collator holds that one token. Without attention_mask among its input
    # names, rows that have no mask get none (transformers would make one).
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    names = ["input_ids", "attention_mask"] if with_attention_mask else ["input_ids"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[PAD]": pad_id}, unk_token="[PAD]")),
        pad_token="[PAD]",
        model_input_names=names,
    )
    return DataCollatorWithPadding(tokenizer)


def collate(
    dataset: datasets.Dataset,
    indices: Iterable[int],
    pad_id: int,
    *,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Rows of a tokenised dataset as one batch, padded to its longest row.

    transformers' ``DataCollatorWithPadding`` pads on the right: ``input_ids`` with
    ``pad_id``, ``attention_mask`` and ``token_type_ids`` with 0.

    Args:
        dataset: a tokenised dataset (see :func:`tokenize`); only the model inputs and
            ``labels`` are taken.
        indices: the rows, in batch order.
        pad_id: the padding id of ``input_ids`` (the model's ``config.pad_token_id``).
        device: where the tensors go; None or the CPU keeps them on the CPU.

    Returns:
        ``input_ids``, ``attention_mask`` and ``token_type_ids`` (those the dataset has) as
        int64 tensors of shape (rows, longest row), and ``labels`` when the dataset has
        them (int64 class indices, or float32 for regression).
    """
    names = [name for name in (*_MODEL_INPUTS, "labels") if name in dataset.column_names]
    columns = dataset[list(indices)]  # one read of the rows, as lists
    rows = [dict(zip(names, values, strict=True))
            for values in zip(*(columns[name] for name in names), strict=True)]
    padder = _padding_collator(int(pad_id), "attention_mask" in names)
    batch = dict(padder(rows))
    if device is not None and device.type != "cpu":
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
    return batch
