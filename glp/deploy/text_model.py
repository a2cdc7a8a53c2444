"""A deployed model that takes text: an ONNX graph and its tokenizer in one folder.

The folder holds ``model.onnx``, ``tokenizer.json`` (the ``tokenizers`` library's file)
and ``glp_text.json``: the labels in class-index order (none for regression), the
maximum length and the padding token. :class:`TextModel` tokenizes a batch of sentences
(or sentence pairs), runs the graph with onnxruntime and returns, per row, the label and
its probability, or the value for regression.

This module imports neither glp, torch nor transformers, and nothing else of glp imports
it by a glp name: a registered version carries this file as its code, so that serving it
needs onnxruntime, tokenizers, numpy and pandas alone. :func:`glp.deploy.export.
write_text_model` writes the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

META = "glp_text.json"
"""The folder's description: labels, max_length, pad_id, pad_token, inputs."""

BATCH = 32
"""Rows per graph call: a long input list is run in slices of this many rows."""

MAX_TOKENS = 4096
"""Most padded tokens per graph call: a slice of long rows runs in smaller calls (by
length), so that memory follows this budget, not the input (onnxruntime held 2.5 GB for
32 rows of 512 tokens of MiniLM, 1.1 GB for 8)."""


class TextModel:
    """An ONNX classifier or regressor behind text in, labels out.

    ``predict(["a fine film", ...])`` (or ``predict(texts, pairs)`` for a pair task)
    returns ``{"label": [...], "score": [...]}``, the label's probability as its score;
    a regressor returns ``{"value": [...]}``. Rows longer than ``max_length`` tokens are
    truncated as they were in training.
    """

    def __init__(self, folder: str | os.PathLike[str], threads: int | None = None,
                 spin: bool = True):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.meta = json.loads((folder / META).read_text())
        self.labels = self.meta.get("labels")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(self.meta["max_length"]))
        self.tokenizer.enable_padding(pad_id=int(self.meta["pad_id"]),
                                      pad_token=self.meta["pad_token"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:  # see glp.deploy.export.OnnxModel: for timing models side by side
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    @property
    def is_regression(self) -> bool:
        return not self.labels

    def logits(self, texts: list[str], pairs: list[str] | None = None):
        """The graph's logits for any number of rows, ``BATCH`` rows per graph call."""
        import numpy as np

        chunks = [self._batch_logits(texts[i:i + BATCH],
                                     None if pairs is None else pairs[i:i + BATCH])
                  for i in range(0, len(texts), BATCH)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels or [0])))

    def _batch_logits(self, texts: list[str], pairs: list[str] | None = None):
        """One graph call, padded to the batch's longest row."""
        import numpy as np

        rows = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
        encodings = self.tokenizer.encode_batch(rows)
        if len(rows) > 1 and len(rows) * len(encodings[0].ids) > MAX_TOKENS:
            return self._split_logits(texts, pairs, [sum(e.attention_mask) for e in encodings])
        arrays = {"input_ids": [e.ids for e in encodings],
                  "attention_mask": [e.attention_mask for e in encodings],
                  "token_type_ids": [e.type_ids for e in encodings]}
        feed = {name: np.asarray(arrays[name], dtype=np.int64) for name in self.inputs}
        return self.session.run(["logits"], feed)[0]

    def _split_logits(self, texts: list[str], pairs: list[str] | None, lengths: list[int]):
        """One slice as several calls of rows of similar length, each within
        :data:`MAX_TOKENS` (a row longer than that alone); logits in the input's order."""
        import numpy as np

        groups: list[list[int]] = [[]]
        for i in sorted(range(len(texts)), key=lengths.__getitem__):
            if groups[-1] and (len(groups[-1]) + 1) * lengths[i] > MAX_TOKENS:
                groups.append([])
            groups[-1].append(i)
        out = None
        for group in groups:
            logits = self._batch_logits([texts[i] for i in group],
                                        None if pairs is None else [pairs[i] for i in group])
            if out is None:
                out = np.zeros((len(texts), logits.shape[1]), dtype=logits.dtype)
            out[group] = logits
        return out

    def predict(self, texts, pairs=None) -> dict[str, list]:
        """Labels and scores (or values) for ``texts`` (a list of strings), with ``pairs``
        as the second sentences of a pair task."""
        import numpy as np

        texts = [str(t) for t in texts]
        pairs = None if pairs is None else [str(p) for p in pairs]
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} text_pair rows")
        logits = self.logits(texts, pairs)
        if self.is_regression:
            return {"value": logits[:, 0].astype(float).tolist()}
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        best = probabilities.argmax(axis=1)
        return {"label": [self.labels[i] for i in best],
                "score": probabilities[np.arange(len(best)), best].astype(float).tolist()}

    def predict_frame(self, frame):
        """:meth:`predict` on a table with a ``text`` column (and ``text_pair`` for a pair
        task), or on a list of strings; returns a ``pandas.DataFrame``."""
        import pandas as pd

        if isinstance(frame, str):
            frame = [frame]
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame({"text": list(frame)})
        if "text" not in frame.columns:
            if len(frame.columns) != 1:
                raise ValueError(f"the input needs a 'text' column; it has "
                                 f"{', '.join(map(str, frame.columns))}")
            frame = frame.rename(columns={frame.columns[0]: "text"})
        pairs = frame["text_pair"].tolist() if "text_pair" in frame.columns else None
        if self.meta.get("pair") and pairs is None:
            raise ValueError("this model reads sentence pairs: give a 'text_pair' column too")
        return pd.DataFrame(self.predict(frame["text"].tolist(), pairs))
