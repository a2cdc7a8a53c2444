"""Tests for glp.training.data: GLUE parsing, user data, subsets, fingerprints and tokenising."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertTokenizerFast

from glp import GlpError
from glp.training.data import (
    GLUE_TASKS,
    TaskData,
    collate,
    fingerprint,
    get_task,
    limit_examples,
    load_glue_split,
    load_glue_task,
    load_user_data,
    split_for_selection,
    tokenize,
)

GLUE_DIR = Path(__file__).resolve().parents[2] / "data" / "glue"


@pytest.fixture(scope="module")
def glue() -> dict[str, TaskData]:
    return {
        name: load_glue_task(name, GLUE_DIR) for name in ("sst2", "mrpc", "rte", "cola", "stsb")
    }


def _ds(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"text_a": [f"row {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}
    )


def _counts(ds: datasets.Dataset) -> collections.Counter:
    # Arrow's to_pylist is ~50x faster than ds["label"] on SST-2 train's 67k rows.
    return collections.Counter(ds.data.column("label").to_pylist())


# --------------------------------------------------------------------------- task specs


@pytest.mark.parametrize("spelling", ["SST-2", "sst2", "Sst_2", "sst-2"])
def test_get_task_normalises_names(spelling: str) -> None:
    assert get_task(spelling).name == "sst2"


def test_get_task_other_spellings() -> None:
    assert get_task("STS-B") is GLUE_TASKS["stsb"]
    assert get_task("CoLA").metric == "mcc"


def test_get_task_unknown_lists_valid_names() -> None:
    with pytest.raises(GlpError) as err:
        get_task("foo")
    assert str(err.value) == (
        "unknown task 'foo'; choose one of: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb"
    )


def test_selection_metrics_follow_the_paper() -> None:
    metrics = {name: spec.metric for name, spec in GLUE_TASKS.items()}
    assert metrics == {
        "cola": "mcc",
        "mnli": "accuracy",
        "mrpc": "f1",
        "qnli": "accuracy",
        "qqp": "f1",
        "rte": "accuracy",
        "sst2": "accuracy",
        "stsb": "spearman",
    }


def test_spec_properties() -> None:
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert not get_task("sst2").is_regression and get_task("sst2").num_labels == 2
    assert get_task("mnli").num_labels == 3
    assert get_task("mrpc").is_pair and not get_task("cola").is_pair


# --------------------------------------------------------------------------- shipped GLUE


@pytest.mark.parametrize(
    ("task", "n_train", "n_dev"),
    [
        ("sst2", 67_349, 872),
        ("mrpc", 3_668, 408),
        ("rte", 2_490, 277),
        ("cola", 8_551, 1_043),
        ("stsb", 5_749, 1_500),
    ],
)
def test_glue_row_counts(glue: dict[str, TaskData], task: str, n_train: int, n_dev: int) -> None:
    data = glue[task]
    assert (len(data.train), len(data.dev)) == (n_train, n_dev)
    assert data.spec is GLUE_TASKS[task]
    expected = ["text_a", "text_b", "label"] if data.spec.is_pair else ["text_a", "label"]
    assert data.train.column_names == expected
    assert data.dev.column_names == expected


def test_qnli_dev_parses() -> None:
    dev = load_glue_split("qnli", GLUE_DIR, "dev")
    assert len(dev) == 5_463
    assert _counts(dev) == {0: 2_702, 1: 2_761}  # entailment first
    assert dev[0]["text_a"] == "What came into force after the new constitution was herald?"


def test_qnli_train_missing_is_explained() -> None:
    with pytest.raises(GlpError) as err:
        load_glue_task("qnli", GLUE_DIR)
    msg = str(err.value)
    assert "QNLI" in msg and "train.tsv" in msg and "dev.tsv only" in msg


def test_label_distributions(glue: dict[str, TaskData]) -> None:
    assert _counts(glue["sst2"].dev) == {1: 444, 0: 428}
    assert _counts(glue["sst2"].train) == {1: 37_569, 0: 29_780}
    assert _counts(glue["mrpc"].dev) == {1: 279, 0: 129}
    assert _counts(glue["mrpc"].train) == {1: 2_474, 0: 1_194}
    assert _counts(glue["rte"].dev) == {0: 146, 1: 131}  # 0 = entailment
    assert _counts(glue["cola"].dev) == {1: 721, 0: 322}
    assert _counts(glue["cola"].train) == {1: 6_023, 0: 2_528}


def test_mrpc_bom_header_is_read(glue: dict[str, TaskData]) -> None:
    # The label lives in the first column, whose header carries the byte-order mark.
    assert get_task("mrpc").label_column == "Quality"
    row = glue["mrpc"].dev[0]
    assert row["label"] == 1
    assert row["text_a"].startswith("He said the foodservice pie business")
    assert row["text_b"].startswith('"The foodservice pie business')  # bare quote kept


def test_cola_has_no_header(glue: dict[str, TaskData]) -> None:
    first = glue["cola"].train[0]
    assert first["text_a"] == (
        "Our friends won't buy this analysis, let alone the next one we propose."
    )
    assert first["label"] == 1
    # dev has no trailing newline: its last row is still read.
    assert glue["cola"].dev[-1]["text_a"]


def test_stsb_labels_are_floats(glue: dict[str, TaskData]) -> None:
    for split in (glue["stsb"].train, glue["stsb"].dev):
        assert split.features["label"] == datasets.Value("float32")
        labels = split["label"]
        assert all(isinstance(v, float) for v in labels[:10])
        assert 0.0 <= min(labels) and max(labels) <= 5.0
    assert glue["stsb"].dev[0]["label"] == pytest.approx(5.0)
    assert glue["stsb"].dev[1]["label"] == pytest.approx(4.75)


def test_classification_labels_are_int64(glue: dict[str, TaskData]) -> None:
    assert glue["sst2"].train.features["label"] == datasets.Value("int64")


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(GlpError, match="nowhere"):
        load_glue_task("sst2", missing)
    with pytest.raises(GlpError, match="SST-2"):
        load_glue_task("sst2", tmp_path)


def _write_tsv(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_qqp_layout_skips_bad_lines(tmp_path: Path) -> None:
    head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    rows = [
        head,
        '0\t1\t2\tHow do I "learn" Python?\tWhat is the way to learn Python?\t1',
        "1\t3\t4\tWhy is the sky blue?\tWhat is NA?\t0",
        "2\t5\t6\ttoo\tmany\tfields\there",  # malformed: skipped
        "3\t7\t8\tshort line",  # missing question2 and label: dropped
        "4\t9\t10\tQuestion?\t\t0",  # empty text: dropped
    ]
    _write_tsv(tmp_path / "QQP" / "train.tsv", rows)
    _write_tsv(tmp_path / "QQP" / "dev.tsv", rows[:3])
    data = load_glue_task("QQP", tmp_path)
    assert data.train["label"] == [1, 0]
    assert data.train["text_a"][0] == 'How do I "learn" Python?'
    assert data.train["text_b"][1] == "What is NA?"  # "NA" is text, not a missing value
    assert data.spec.metric == "f1"


def test_mnli_layout(tmp_path: Path) -> None:
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    body = [
        "0\t1\t1e\tfiction\tA man sleeps.\tA person rests.\tentailment\tentailment",
        "1\t2\t2n\tfiction\tA man sleeps.\tHe is tired.\tneutral\tneutral",
        "2\t3\t3c\tfiction\tA man sleeps.\tHe runs.\tcontradiction\tcontradiction",
    ]
    _write_tsv(tmp_path / "MNLI" / "train.tsv", [head, *body])
    _write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", [head, *body[:2]])
    data = load_glue_task("mnli", tmp_path)
    assert data.train["label"] == [1, 2, 0]  # contradiction, entailment, neutral
    assert len(data.dev) == 2


def test_unknown_glue_label_is_an_error(tmp_path: Path) -> None:
    _write_tsv(tmp_path / "SST-2" / "train.tsv", ["sentence\tlabel", "good\t1", "odd\t7"])
    _write_tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence\tlabel", "good\t1"])
    with pytest.raises(GlpError, match="'7'.*expected one of: 0, 1"):
        load_glue_task("sst2", tmp_path)


# --------------------------------------------------------------------------- user data


_ROWS = {
    "review": ["great film", "dull", "fine", "awful", "superb"],
    "other": ["a", "b", "c", "d", "e"],
    "sentiment": ["pos", "neg", "neutral", "neg", "pos"],
}


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_user_data_formats(tmp_path: Path, ext: str) -> None:
    df = pd.DataFrame(_ROWS)
    path = tmp_path / f"train{ext}"
    if ext == ".csv":
        df.to_csv(path, index=False)
    elif ext == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif ext == ".json":
        df.to_json(path, orient="records")
    elif ext == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    data = load_user_data(path, text_columns="review", label_column="sentiment")
    assert data.spec.label_names == ("neg", "neutral", "pos")  # sorted
    assert data.train["label"] == [2, 0, 1, 0, 2]
    assert data.train["text_a"] == _ROWS["review"]
    assert data.train.column_names == ["text_a", "label"]
    assert data.dev is None
    assert data.spec.metric == "accuracy" and data.spec.name == "custom"


def test_user_data_pairs_dev_and_regression(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    dev = tmp_path / "dev.jsonl"
    rows = [{"s1": f"a{i}", "s2": f"b{i}", "y": i / 2} for i in range(6)]
    train.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    dev.write_text("\n".join(json.dumps(r) for r in rows[:2]), encoding="utf-8")
    data = load_user_data(
        str(train), str(dev), text_columns=["s1", "s2"], label_column="y", task_type="regression"
    )
    assert data.spec.is_regression and data.spec.metric == "spearman"
    assert data.train.features["label"] == datasets.Value("float32")
    assert data.train["text_b"][1] == "b1"
    assert data.dev["label"] == [0.0, 0.5]


def test_user_integer_labels_keep_numeric_order(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame({"t": ["x", "y", "z"], "l": [10, 2, 2]}).to_csv(path, index=False)
    data = load_user_data(path, text_columns="t", label_column="l", metric="f1")
    assert data.spec.label_names == ("2", "10")
    assert data.train["label"] == [1, 0, 0]
    assert data.spec.metric == "f1"


def test_user_data_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    pd.DataFrame({"a": [1], "b": [2], "c": [3]}).to_csv(path, index=False)
    with pytest.raises(GlpError) as err:
        load_user_data(path, text_columns="x", label_column="c")
    assert str(err.value) == "column 'x' not found in train.csv; columns are: a, b, c"


def test_user_data_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GlpError, match="nope.csv.*: no such file"):
        load_user_data(tmp_path / "nope.csv", text_columns="t", label_column="l")
    with pytest.raises(GlpError, match="nope.parquet"):
        load_user_data(str(tmp_path / "nope.parquet"), text_columns="t", label_column="l")


def test_user_data_bad_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.xlsx"
    path.write_text("x")
    with pytest.raises(GlpError) as err:
        load_user_data(path, text_columns="t", label_column="l")
    msg = str(err.value)
    assert "'.xlsx'" in msg and ".csv" in msg and ".parquet" in msg


def test_user_data_bad_options(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame({"t": ["x"], "l": [1]}).to_csv(path, index=False)
    with pytest.raises(GlpError, match="'bleu'.*accuracy, f1, mcc"):
        load_user_data(path, text_columns="t", label_column="l", metric="bleu")
    with pytest.raises(GlpError, match="'spearman'"):
        load_user_data(path, text_columns="t", label_column="l", metric="spearman")
    with pytest.raises(GlpError, match="'ranking'.*classification, regression"):
        load_user_data(path, text_columns="t", label_column="l", task_type="ranking")
    with pytest.raises(GlpError, match=r"once \(one text\) or twice \(a pair\), got 3"):
        load_user_data(path, text_columns=["t", "t", "t"], label_column="l")


def test_user_regression_needs_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame({"t": ["x", "y"], "l": ["1.5", "high"]}).to_csv(path, index=False)
    with pytest.raises(GlpError, match="'high'"):
        load_user_data(path, text_columns="t", label_column="l", task_type="regression")


def test_user_hub_failure_is_glp_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(GlpError, match="'someone/some-data'.*offline"):
        load_user_data("someone/some-data", text_columns="t", label_column="l")


def test_user_hub_dataset_uses_validation_split(monkeypatch: pytest.MonkeyPatch) -> None:
    feats = datasets.Features(
        {"t": datasets.Value("string"), "l": datasets.ClassLabel(names=["no", "yes"])}
    )
    dsd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"t": ["a", "b"], "l": [1, 0]}, features=feats),
        validation=datasets.Dataset.from_dict({"t": ["c"], "l": [1]}, features=feats),
    )
    calls = []

    def fake(hub_id: str, config: str | None = None) -> datasets.DatasetDict:
        calls.append((hub_id, config))
        return dsd

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = load_user_data("owner/data", text_columns="t", label_column="l", dataset_config="x")
    assert calls == [("owner/data", "x")]
    assert data.spec.label_names == ("no", "yes")
    assert data.train["label"] == [1, 0] and data.dev["label"] == [1]


# --------------------------------------------------------------------------- subsets


def test_limit_examples() -> None:
    ds = _ds(100)
    a = limit_examples(ds, 10, seed=3)
    assert len(a) == 10 and a["text_a"] == limit_examples(ds, 10, seed=3)["text_a"]
    assert a["text_a"] != limit_examples(ds, 10, seed=4)["text_a"]
    assert set(a["text_a"]) <= set(limit_examples(ds, 20, seed=3)["text_a"])  # nested
    assert limit_examples(ds, None) is ds and len(limit_examples(ds, 500)) == 100
    for bad in (0, -1):
        with pytest.raises(GlpError, match=str(bad)):
            limit_examples(ds, bad)


def test_split_for_selection() -> None:
    ds = _ds(200)
    fit, sel = split_for_selection(ds, seed=1)
    assert (len(fit), len(sel)) == (170, 30)
    fit_rows, sel_rows = set(fit["text_a"]), set(sel["text_a"])
    assert not fit_rows & sel_rows and fit_rows | sel_rows == set(ds["text_a"])
    fit2, sel2 = split_for_selection(ds, seed=1)
    assert fit2["text_a"] == fit["text_a"] and sel2["text_a"] == sel["text_a"]
    assert split_for_selection(ds, seed=2)[1]["text_a"] != sel["text_a"]
    assert len(split_for_selection(_ds(100))[1]) == 15


def _rare_classes() -> datasets.Dataset:
    """20 classes: 10 with 5 rows, 10 with 20 (the issue's bring-your-own data)."""
    labels = [c for c in range(10) for _ in range(5)] + [c for c in range(10, 20)
                                                         for _ in range(20)]
    return datasets.Dataset.from_dict({"text_a": [f"row {i}" for i in range(len(labels))],
                                       "label": labels})


def test_a_stratified_split_keeps_every_class_with_two_rows_in_the_selection_split() -> None:
    ds = _rare_classes()
    plain = split_for_selection(ds, seed=0)[1]
    assert len(set(plain["label"])) < 20  # what the unstratified split did
    fit, sel = split_for_selection(ds, seed=0, by="label")
    assert set(sel["label"]) == set(range(20)) and set(fit["label"]) == set(range(20))
    assert len(fit) + len(sel) == len(ds) and not set(fit["text_a"]) & set(sel["text_a"])
    counts = collections.Counter(sel["label"])
    assert counts[0] == 1 and counts[10] == 3  # each class its share
    again = split_for_selection(ds, seed=0, by="label")[1]
    assert again["text_a"] == sel["text_a"]


def _spec(names):
    return get_task("sst2").__class__(**{**get_task("sst2").__dict__, "label_names": names})


def test_too_small_a_selection_split_is_refused_naming_the_minimum() -> None:
    from glp.training.data import check_selection

    three = datasets.Dataset.from_dict({"text_a": ["a", "b", "c"], "label": [0, 1, 0]})
    with pytest.raises(GlpError, match=r"3 training row\(s\) leave 1 for the selection split "
                                       r".* at least 4: give at least 24 training rows"):
        check_selection(three, 0.15, 0, _spec(("neg", "pos")))
    assert check_selection(_ds(40), 0.15, 0, _spec(("neg", "pos"))) == []


def test_a_class_missing_from_the_selection_split_is_warned_about() -> None:
    from glp.training.data import check_selection

    ds = datasets.Dataset.from_dict({"text_a": [f"r{i}" for i in range(41)],
                                     "label": [0, 1] * 20 + [2]})
    notes = check_selection(ds, 0.15, 0, _spec(("a", "b", "c")))
    assert notes == ["class 'c' has 1 training row, so none in the selection split: "
                     "candidates are not judged on it"]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_bad_fraction(fraction: float) -> None:
    with pytest.raises(GlpError, match=str(fraction)):
        split_for_selection(_ds(10), fraction)


def test_split_too_small() -> None:
    with pytest.raises(GlpError, match="1 row"):
        split_for_selection(_ds(1))
    assert [len(p) for p in split_for_selection(_ds(2))] == [1, 1]


def test_fingerprint() -> None:
    ds = _ds(50)
    fp = fingerprint(ds)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(_ds(50)) == fp  # a fresh object with the same rows
    # Same rows reached through select (an indices mapping) hash the same.
    assert fingerprint(ds.select(range(10))) == fingerprint(_ds(10))
    changed = ds.map(lambda r, i: {"text_a": "x" if i == 7 else r["text_a"]}, with_indices=True)
    assert fingerprint(changed) != fp
    relabelled = datasets.Dataset.from_dict({"text_a": ds["text_a"], "label": [0] * 50})
    assert fingerprint(relabelled) != fp
    assert fingerprint(ds.select(range(49))) != fp


def test_fingerprint_stable_across_loads(glue: dict[str, TaskData]) -> None:
    assert fingerprint(load_glue_task("rte", GLUE_DIR).dev) == fingerprint(glue["rte"].dev)


# --------------------------------------------------------------------------- tokenising

_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
]


@pytest.fixture()
def tiny_tokenizer() -> BertTokenizerFast:
    # transformers 5 takes the vocab (a dict or a vocab.txt path) as ``vocab``.
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(_VOCAB)})


class _Counting:
    """Wraps a tokenizer and counts batched calls (the map work, not the probe)."""

    def __init__(self, tokenizer: BertTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.batches = 0

    def __call__(self, text, text_pair=None, **kwargs):
        if isinstance(text, list):
            self.batches += 1
        return self.tokenizer(text, text_pair, **kwargs)


def _pairs() -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "text_a": ["the cat sat on the mat", "a dog"],
            "text_b": ["the dog sat", "the cat sat on a mat the end"],
            "label": [1, 0],
        }
    )


def test_tokenize_single_no_padding(tiny_tokenizer: BertTokenizerFast) -> None:
    ds = datasets.Dataset.from_dict(
        {"text_a": ["the cat sat on the mat", "a dog"], "label": [1, 0]}
    )
    out = tokenize(ds, tiny_tokenizer, max_length=6, tokenizer_key="tiny")
    assert set(out.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert out[0]["input_ids"] == [2, 5, 7, 9, 10, 3]  # [CLS] the cat sat on [SEP]
    assert out[1]["input_ids"] == [2, 6, 8, 3]  # not padded
    assert out["labels"] == [1, 0]


def test_tokenize_pairs_and_regression(tiny_tokenizer: BertTokenizerFast) -> None:
    out = tokenize(_pairs(), tiny_tokenizer, max_length=8, tokenizer_key="tiny")
    assert all(len(ids) <= 8 for ids in out["input_ids"])
    assert out[0]["token_type_ids"][-1] == 1  # the second text is segment 1
    assert out[0]["input_ids"].count(3) == 2  # two [SEP]s
    reg = _pairs().cast_column("label", datasets.Value("float32"))
    out = tokenize(reg, tiny_tokenizer, max_length=8)
    assert out.features["labels"] == datasets.Value("float32")


def test_tokenize_cache_reuse(tiny_tokenizer: BertTokenizerFast, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ds = _pairs()
    counting = _Counting(tiny_tokenizer)
    first = tokenize(ds, counting, max_length=8, cache_dir=cache, tokenizer_key="tiny")
    expected = cache / f"{fingerprint(ds)}-tiny-8.arrow"
    assert expected.is_file() and counting.batches == 1
    mtime = os.stat(expected).st_mtime_ns
    second = tokenize(ds, counting, max_length=8, cache_dir=cache, tokenizer_key="tiny")
    assert counting.batches == 1  # served from the cache file, not recomputed
    assert os.stat(expected).st_mtime_ns == mtime
    assert second["input_ids"] == first["input_ids"]
    assert second.cache_files[0]["filename"] == str(expected)
    tokenize(ds, counting, max_length=4, cache_dir=cache, tokenizer_key="tiny")
    assert counting.batches == 2 and (cache / f"{fingerprint(ds)}-tiny-4.arrow").is_file()


def test_tokenize_derives_a_key(tiny_tokenizer: BertTokenizerFast, tmp_path: Path) -> None:
    tokenize(_pairs(), tiny_tokenizer, max_length=8, cache_dir=tmp_path / "c")
    (name,) = os.listdir(tmp_path / "c")
    assert name.startswith(fingerprint(_pairs()) + "-") and name.endswith("-8.arrow")
    assert "--" not in name


def _user(tmp_path, name, frame):
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    return path


def test_a_non_finite_regression_label_is_refused(tmp_path: Path) -> None:
    for bad in ("NaN", "inf", "-inf"):
        path = _user(tmp_path, "t", pd.DataFrame({"t": ["x", "y", "z"], "l": ["1.5", bad, "2"]}))
        with pytest.raises(GlpError, match=rf"label '?{bad}'? .* \(data row 2\) is not a finite"):
            load_user_data(path, text_columns="t", label_column="l", task_type="regression")


def test_check_labels_refuses_one_class_and_unseen_dev_labels(tmp_path: Path) -> None:
    from glp.training.data import check_labels

    train = _user(tmp_path, "train", pd.DataFrame({"t": list("abcd"), "l": ["x", "y"] * 2}))
    dev = _user(tmp_path, "dev", pd.DataFrame({"t": list("abc"), "l": ["x", "z", "z"]}))
    data = load_user_data(train, dev, text_columns="t", label_column="l")
    with pytest.raises(GlpError, match=r"dev label\(s\) 'z' in dev.csv \(2 row\(s\)\) never "
                                       r"occur in the training data train.csv"):
        check_labels(data.train, data.dev, data.spec)
    only_x = data.train.filter(lambda row: row["label"] == 0)
    with pytest.raises(GlpError, match=r"train.csv \(the --train-limit subset\) holds one "
                                       r"class \('x'\)"):
        check_labels(only_x, None, data.spec, limited=True)
    same = load_user_data(train, train, text_columns="t", label_column="l")
    check_labels(same.train, same.dev, same.spec)  # fine: nothing raised


# --------------------------------------------------------------------------- batching


def _reference_batch(ds: datasets.Dataset, indices: list[int], pad_id: int) -> dict:
    """The padding glp wrote by hand before transformers' collator: right-padded to the
    longest row, ``pad_id`` in ``input_ids`` and 0 in the masks; labels as they are."""
    width = max(len(ds[i]["input_ids"]) for i in indices)
    batch = {}
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        if name in ds.column_names:
            fill = pad_id if name == "input_ids" else 0
            rows = [ds[i][name] + [fill] * (width - len(ds[i][name])) for i in indices]
            batch[name] = torch.tensor(rows, dtype=torch.long)
    if "labels" in ds.column_names:
        labels = [ds[i]["labels"] for i in indices]
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long
        batch["labels"] = torch.tensor(labels, dtype=dtype)
    return batch


def _assert_same_batch(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def _token_rows(n: int, regression: bool, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 99, size=int(rng.integers(1, 20))).tolist() for _ in range(n)]
    rows = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
            "token_type_ids": [rng.integers(0, 2, size=len(r)).tolist() for r in ids],
            "labels": [float(rng.normal()) if regression else int(rng.integers(0, 3))
                       for _ in ids],
            "note": ["not a model input"] * n}
    features = datasets.Features(
        {k: datasets.List(datasets.Value("int64"))
         for k in ("input_ids", "attention_mask", "token_type_ids")}
        | {"labels": datasets.Value("float32" if regression else "int64"),
           "note": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def test_collate_pads_on_the_right_with_the_padding_id() -> None:
    ds = datasets.Dataset.from_dict({
        "input_ids": [[2, 7, 3], [2, 8, 9, 10, 3]], "attention_mask": [[1] * 3, [1] * 5],
        "token_type_ids": [[0, 0, 1], [0, 0, 0, 1, 1]], "labels": [1, 0]})
    batch = collate(ds, [1, 0], pad_id=1)
    assert batch["input_ids"].tolist() == [[2, 8, 9, 10, 3], [2, 7, 3, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert batch["labels"].tolist() == [0, 1]
    assert all(t.dtype == torch.long and t.device.type == "cpu" for t in batch.values())


@pytest.mark.parametrize("regression", [False, True])
@pytest.mark.parametrize("dropped", [(), ("token_type_ids",), ("labels",), ("attention_mask",),
                                     ("attention_mask", "token_type_ids")])
def test_collate_gives_the_batches_of_the_hand_written_padding(regression, dropped) -> None:
    ds = _token_rows(40, regression).remove_columns(list(dropped))
    rng = np.random.default_rng(1)
    for pad_id in (0, 1, 7):
        for size in (1, 2, 9, 40):
            indices = rng.permutation(len(ds))[:size].tolist()
            batch = collate(ds, indices, pad_id)
            _assert_same_batch(batch, _reference_batch(ds, indices, pad_id))
    # Only model inputs and labels, and no attention mask made up for rows without one.
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"} - set(dropped)


def test_collate_equals_the_tokenizers_own_padding(tiny_tokenizer: BertTokenizerFast) -> None:
    out = tokenize(_pairs(), tiny_tokenizer, max_length=16, tokenizer_key="tiny")
    padded = tiny_tokenizer(list(_pairs()["text_a"]), list(_pairs()["text_b"]), truncation=True,
                            max_length=16, padding=True, return_tensors="pt")
    batch = collate(out, range(len(out)), tiny_tokenizer.pad_token_id)
    assert batch["attention_mask"].tolist()[0][-1] == 0  # the first pair is padded
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[name], padded[name]), name
    assert batch["labels"].tolist() == [1, 0]
