"""The text-in deployment folder: ONNX graph + tokenizer.json, labels out as PyTorch's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from glp.core.checkpoint import save_pretrained
from glp.core.models import load_classifier, load_tokenizer
from glp.deploy.export import write_text_model
from glp.deploy.text_model import BATCH, TextModel

TEXTS = ["a gripping, beautifully acted film", "the plot never comes together",
         "it is what it is " * 40]


def _saved(tiny_bert, tmp_path, num_labels=2, is_regression=False):
    model = load_classifier(tiny_bert, num_labels=num_labels, is_regression=is_regression,
                            seed=3)
    path = tmp_path / "model"
    save_pretrained(model, path)
    load_tokenizer(tiny_bert).save_pretrained(path)
    return model.eval(), path


def _torch_logits(model, tiny_bert, texts, pairs=None, max_length=16):
    tokenizer = load_tokenizer(tiny_bert)
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.numpy()


@pytest.fixture(scope="module")
def classifier(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    model, path = _saved(tiny_bert, tmp)
    folder = write_text_model(path, tmp / "served", labels=("neg", "pos"), max_length=16)
    return model, folder


def test_labels_and_scores_are_pytorchs_with_the_same_truncation(classifier, tiny_bert):
    model, folder = classifier
    served = TextModel(folder).predict(TEXTS)
    probabilities = torch.tensor(_torch_logits(model, tiny_bert, TEXTS)).softmax(-1)
    assert served["label"] == [("neg", "pos")[i] for i in probabilities.argmax(-1)]
    np.testing.assert_allclose(served["score"], probabilities.max(-1).values, atol=1e-5)


def test_many_rows_run_in_batches_with_the_same_answers(classifier):
    _, folder = classifier
    model = TextModel(folder)
    rows = [f"row {i} " * (i % 7 + 1) for i in range(BATCH * 2 + 3)]
    together = model.predict(rows)
    alone = [model.predict([row]) for row in rows[:: BATCH // 2]]
    assert len(together["label"]) == len(rows)
    np.testing.assert_allclose([a["score"][0] for a in alone], together["score"][:: BATCH // 2],
                               atol=1e-5)


def test_frames_lists_and_single_strings_are_read_alike(classifier):
    _, folder = classifier
    model = TextModel(folder)
    frame = model.predict_frame(pd.DataFrame({"text": TEXTS[:2]}))
    assert list(frame.columns) == ["label", "score"]
    assert frame.equals(model.predict_frame(TEXTS[:2]))
    assert model.predict_frame(TEXTS[0]).equals(frame.iloc[:1])
    assert model.predict([])["label"] == []
    with pytest.raises(ValueError, match="'text' column"):
        model.predict_frame(pd.DataFrame({"a": ["x"], "b": ["y"]}))


def test_pairs_and_regression(tiny_bert, tmp_path):
    model, path = _saved(tiny_bert, tmp_path, num_labels=1, is_regression=True)
    folder = write_text_model(path, tmp_path / "served", labels=None, max_length=16, pair=True)
    served = TextModel(folder)
    first, second = TEXTS[:2], TEXTS[1:3]
    values = served.predict(first, second)["value"]
    np.testing.assert_allclose(values, _torch_logits(model, tiny_bert, first, second)[:, 0],
                               atol=1e-5)
    frame = served.predict_frame(pd.DataFrame({"text": first, "text_pair": second}))
    assert list(frame.columns) == ["value"]
    with pytest.raises(ValueError, match="text_pair"):
        served.predict_frame(pd.DataFrame({"text": first}))
    with pytest.raises(ValueError, match="2 texts but 1 text_pair"):
        served.predict(first, second[:1])


def test_int8_folder_agrees_with_fp32_on_most_rows(classifier, tiny_bert, tmp_path):
    model, _ = classifier
    path = tmp_path / "model"
    save_pretrained(model, path)
    load_tokenizer(tiny_bert).save_pretrained(path)
    folder = write_text_model(path, tmp_path / "int8", labels=("neg", "pos"), max_length=16,
                              int8=True)
    assert (folder / "model.onnx").stat().st_size < (path / "model.safetensors").stat().st_size
    assert len(TextModel(folder).predict(TEXTS)["label"]) == len(TEXTS)



def test_linking_into_a_folder_never_writes_through_an_existing_link(tmp_path):
    """A second file linked or copied onto a name that is already a hard link replaces
    the name; the file the first link shares is untouched."""
    import os

    from glp.deploy.export import link_or_copy

    first, second, folder = tmp_path / "a", tmp_path / "b", tmp_path / "folder"
    first.write_bytes(b"AAAA")
    second.write_bytes(b"BBBB")
    folder.mkdir()
    link_or_copy(first, folder / "w")
    link_or_copy(second, folder / "w")
    assert first.read_bytes() == b"AAAA" and (folder / "w").read_bytes() == b"BBBB"
    assert os.path.samefile(second, folder / "w")
    assert [p.name for p in folder.iterdir()] == ["w"]  # no temporary left


def test_long_rows_run_in_calls_within_the_token_budget(classifier, monkeypatch):
    """Rows whose padded slice would pass the budget run as smaller calls, by length, with
    the same answers, in the input's order."""
    import glp.deploy.text_model as text_model

    _, folder = classifier
    model = TextModel(folder)
    rows = [f"word {i} " * (1 + (i * 5) % 9) for i in range(20)]
    together = model.logits(rows)
    calls = []
    run = model.session.run

    def counted(names, feed):
        calls.append(feed["input_ids"].size)
        return run(names, feed)

    monkeypatch.setattr(text_model, "MAX_TOKENS", 40)
    monkeypatch.setattr(model.session, "run", counted, raising=False)
    split = model.logits(rows)
    assert len(calls) > 1 and max(calls) <= 40
    np.testing.assert_allclose(split, together, atol=1e-5)
