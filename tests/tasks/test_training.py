"""The training tasks' cache keys, the per-job tokenisation, and a full disk."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest

import tasks.training
from glp.training.config import FineTuneConfig
from tasks.data import DataRef
from tasks.faults import retry_unless_hopeless
from tasks.home import RunHome
from tasks.training import FineTuneRequest, NoSpace, save_atomically


def _request(tmp_path: Path, **overrides) -> FineTuneRequest:
    data = DataRef(task="sst2", metric="accuracy", is_regression=False, num_labels=2,
                   label_names=("0", "1"), paths={"fit": "fit.parquet"},
                   fingerprints={"fit": "abc"}, sizes={"fit": 10})
    values = dict(model_path="m", model_fingerprint="fp", data=data, split="fit",
                  removed=(1,), config=FineTuneConfig(), seed=41,
                  home=RunHome(tmp_path), device="cpu")
    return FineTuneRequest(**{**values, **overrides})


def test_the_key_holds_what_changes_a_result_and_nothing_else(tmp_path, monkeypatch):
    base = _request(tmp_path).key
    assert _request(tmp_path, config=FineTuneConfig(learning_rate=3e-5)).key != base
    assert _request(tmp_path, config=FineTuneConfig(max_grad_norm=None)).key != base
    assert _request(tmp_path, seed=42).key != base
    assert _request(tmp_path, removed=(2,)).key != base
    assert _request(tmp_path, device="cuda:0").key != base  # another kind of device
    assert _request(tmp_path, device="cuda:0").key == _request(tmp_path, device="cuda:1").key
    # Speed-only settings are not in it.
    assert _request(tmp_path, config=FineTuneConfig(eval_batch_size=7)).key == base
    assert _request(tmp_path, trust_remote_code=True).key == base
    # The code that runs it is.
    monkeypatch.setattr(tasks.training, "code_fingerprint", lambda *a, **k: "edited")
    assert _request(tmp_path).key != base


def test_a_split_is_tokenised_once_per_job(tiny_bert, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    path = tmp_path / "fit.parquet"
    rows = datasets.Dataset.from_dict({"text_a": ["a good film", "a bad one"], "label": [1, 0]})
    pq.write_table(rows.data.table, path)
    data = DataRef(task="sst2", metric="accuracy", is_regression=False, num_labels=2,
                   label_names=("0", "1"), paths={"fit": str(path)},
                   fingerprints={"fit": "f1"}, sizes={"fit": 2})
    home = RunHome(tmp_path / "home").create()
    tasks.training._tokenized.cache_clear()
    first, tokenizer = tasks.training.tokenized(data, "fit", str(tiny_bert), 16, home)
    second, again = tasks.training.tokenized(data, "fit", str(tiny_bert), 16, home)
    assert first is second and tokenizer is again  # no re-read, re-tokenise or reload
    assert tasks.training._tokenized.cache_info().misses == 1
    assert first["input_ids"][0][0] == tokenizer.cls_token_id


class _FullDisk:
    """A model whose save fails half-way as a full disk fails it: an OSError, or the
    safetensors writer's own error (what a real full disk raised)."""

    def __init__(self, error=None):
        self.error = error or OSError(errno.ENOSPC, "No space left on device")

    def parameters(self):
        import torch

        return [torch.zeros(1000)]

    def save_pretrained(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise self.error


def _safetensor_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")


@pytest.mark.parametrize("error", [None, "safetensors"])
def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_folder(tmp_path, error):
    target = tmp_path / "home" / "artifacts" / "finals" / "key"
    target.parent.mkdir(parents=True)
    model = _FullDisk(_safetensor_error() if error else None)
    with pytest.raises(NoSpace, match=r"no space left on the device of the run home "
                                      rf"{tmp_path / 'home'} \([\d,]+ MB free; a checkpoint of "
                                      r"this model needs about 0 MB\)"):
        save_atomically(model, None, target)
    assert list(target.parent.iterdir()) == []


def test_a_full_disk_and_bad_input_are_not_retried():
    def state(exc):
        return SimpleNamespace(data=exc)

    assert retry_unless_hopeless(None, None, state(NoSpace("full"))) is False
    assert retry_unless_hopeless(None, None, state(OSError(errno.ENOSPC, "full"))) is False
    assert retry_unless_hopeless(None, None, state(_safetensor_error())) is False
    assert retry_unless_hopeless(None, None, state(OSError(errno.EIO, "io"))) is True
    assert retry_unless_hopeless(None, None, state(RuntimeError("flaky"))) is True


def test_a_distilled_fine_tune_is_keyed_by_its_teacher_and_temperature(tmp_path):
    from tasks.training import Teacher

    plain = _request(tmp_path).key
    teacher = Teacher(path="t", key="teacher-a", temperature=2.0)
    distilled = _request(tmp_path, teacher=teacher).key
    assert distilled != plain
    assert _request(tmp_path, teacher=teacher.model_copy(update={"key": "teacher-b"})).key \
        != distilled
    assert _request(tmp_path, teacher=teacher.model_copy(update={"temperature": 4.0})).key \
        != distilled
    # Where the teacher lies on disk is not what it is.
    assert _request(tmp_path, teacher=teacher.model_copy(update={"path": "u"})).key == distilled
