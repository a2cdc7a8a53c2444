"""Exporting a (compressed) model to ONNX, optionally int8: deployment as one file.

The graph takes ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` where the
family uses them), with dynamic batch and sequence axes, and returns ``logits``. It runs
under onnxruntime with neither glp, transformers nor torch installed; the tokenizer is
the ``tokenizer.json`` saved beside the model (the ``tokenizers`` package reads it).
``--int8`` applies onnxruntime's dynamic quantisation (int8 weights of the matrix
multiplies, activations quantised at run time).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from glp.core.errors import GlpError, ParamError

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(model) -> list[str]:
    """The inputs a model's graph takes (token_type_ids only where the family has them)."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    names = [name for name in INPUTS if name in accepted]
    if "token_type_ids" in names and not getattr(model.config, "type_vocab_size", 0):
        names.remove("token_type_ids")  # RoBERTa-likes accept it but have one type
    if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "mpnet"):
        names = [n for n in names if n != "token_type_ids"]
    return names


def export_onnx(model_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                int8: bool = False, opset: int = OPSET, fold: bool = True) -> Path:
    """Write ``model_dir``'s model as an ONNX graph to ``out`` (atomically).

    Args:
        model_dir: a directory written by glp (or any supported ``save_pretrained`` one).
        out: the ``.onnx`` file to write.
        int8: dynamic int8 quantisation with onnxruntime.
        opset: the ONNX opset.
        fold: fold constants at export (transposed weights become new tensors). False
            keeps every weight as the model holds it, so that :func:`share_weights` finds
            it in the checkpoint; onnxruntime folds them when it loads the graph. int8
            always folds: the quantiser needs the weights as the multiplies' inputs.

    Returns:
        The written file.

    Raises:
        GlpError: the model cannot be loaded, or onnx/onnxruntime is missing.
    """
    import torch

    from glp.core.checkpoint import load_pretrained

    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise GlpError("ONNX export needs the onnx package: pip install onnx onnxruntime"
                       ) from None
    target = Path(out)
    if target.is_dir():
        raise ParamError("out", repr(str(out)), "the .onnx file to write, not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    model = load_pretrained(model_dir)
    names = model_inputs(model)
    example = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]] * 2),
               "attention_mask": torch.ones(2, 8, dtype=torch.long),
               "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}

    class Logits(torch.nn.Module):  # positional inputs, one named output
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args, strict=True))).logits

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    quantized = tmp.with_name(tmp.name + ".int8")
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow
            torch.onnx.export(Logits(model).eval(), tuple(example[n] for n in names),
                              str(tmp), input_names=names, output_names=["logits"],
                              dynamic_axes={**axes, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False,
                              do_constant_folding=fold or int8)
        if int8:
            try:
                from onnxruntime.quantization import QuantType, quantize_dynamic
            except ImportError:
                raise GlpError("int8 quantisation needs onnxruntime: pip install onnxruntime"
                               ) from None
            logging.disable(logging.WARNING)  # "consider pre-processing": advice only
            try:
                quantize_dynamic(str(tmp), str(quantized), weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
            os.replace(quantized, target)
        else:
            os.replace(tmp, target)
    finally:  # nothing half-written is left beside the target
        tmp.unlink(missing_ok=True)
        quantized.unlink(missing_ok=True)
    return target


def onnx_logits(path: str | os.PathLike[str], inputs: dict, threads: int | None = None):
    """Run an exported graph with onnxruntime on numpy inputs; returns the logits."""
    return OnnxModel(path, threads)(**inputs).logits


SAMPLE_TEXTS = ("a gripping, beautifully acted film", "the plot never comes together",
                "it is what it is", "an hour and a half of my life I will not get back")


def compare_with_torch(model_dir: str | os.PathLike[str], onnx_path: str | os.PathLike[str],
                       texts: tuple[str, ...] = SAMPLE_TEXTS) -> float:
    """The largest absolute difference between the graph's and PyTorch's logits on a few
    sentences, tokenised with the directory's tokenizer (padded batch)."""
    import numpy as np
    import torch

    from glp.core.checkpoint import load_pretrained
    from glp.core.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    model = load_pretrained(model_dir)
    names = model_inputs(model)
    with torch.inference_mode():
        expected = model(**{k: v for k, v in batch.items() if k in names}).logits.numpy()
    actual = onnx_logits(onnx_path, {k: v.numpy() for k, v in batch.items()})
    return float(np.abs(actual - expected).max())


class OnnxModel:
    """An exported graph behind a model's calling convention: ``model(**inputs).logits``.

    For timing side by side with PyTorch models (:func:`glp.deploy.bench.measure_latency`): it
    takes the same tensors and answers ``eval()``/``train()``/``parameters()`` like a module.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None,
                 spin: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            # onnxruntime's threads spin for a while after each run (its default, fastest
            # when it has the machine to itself); timed side by side with PyTorch, they
            # would steal the cores of whatever runs next.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.training = False

    def __call__(self, **inputs):
        from types import SimpleNamespace

        import numpy as np

        feed = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.int64)
                for k, v in inputs.items() if k in self.inputs}
        if "token_type_ids" in self.inputs and "token_type_ids" not in feed:  # one sentence
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return SimpleNamespace(logits=self.session.run(["logits"], feed)[0])

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):
        return iter(())


def share_weights(graph: str | os.PathLike[str], weights: str | os.PathLike[str]) -> int:
    """Store each weight of ``graph`` that is byte-for-byte a tensor of ``weights`` (a
    safetensors file in the graph's folder) as ONNX external data pointing into that file,
    and rewrite the graph (atomically); the rest stays inside it. The graph and the
    checkpoint then share one copy of the weights. Returns the bytes shared."""
    import hashlib
    import json

    import onnx

    graph, weights = Path(graph), Path(weights)
    if weights.parent != graph.parent:
        raise ValueError("the weights must be in the graph's folder")
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header, base = json.loads(data[8:8 + length]), 8 + length
    spans = {}
    for name, entry in header.items():
        if name != "__metadata__":
            start, end = entry["data_offsets"]
            spans.setdefault(hashlib.sha256(data[base + start:base + end]).digest(),
                             (base + start, end - start))
    model = onnx.load(str(graph))
    shared = 0
    for tensor in model.graph.initializer:
        span = spans.get(hashlib.sha256(tensor.raw_data).digest()) if tensor.raw_data else None
        if span is None or span[1] != len(tensor.raw_data):
            continue
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", weights.name), ("offset", str(span[0])),
                           ("length", str(span[1]))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        shared += span[1]
    tmp = graph.with_name(f".{graph.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, graph)
    finally:
        tmp.unlink(missing_ok=True)
    return shared


def link_or_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]):
    """A hard link at ``target`` to ``source``, or a copy where the file system refuses
    (files glp writes are never changed in place, so a link shares nothing that moves)."""
    import shutil

    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, tmp)
    os.replace(tmp, target)  # never written into: an existing target may be a link too
    return target


def write_text_model(model_dir: str | os.PathLike[str], folder: str | os.PathLike[str], *,
                     labels: tuple[str, ...] | None, max_length: int, pair: bool = False,
                     int8: bool = False) -> Path:
    """A folder that :class:`glp.deploy.text_model.TextModel` serves: the model as ONNX
    (``int8``: quantised), its tokenizer as ``tokenizer.json`` and ``glp_text.json``.

    An fp32 folder is also the model directory itself (``glp.load_pretrained(folder)``,
    the PyTorch path to fine-tune further): it holds ``model_dir``'s files (hard links
    where the file system allows), and the graph keeps its weights in the folder's
    ``model.safetensors`` (:func:`share_weights`), so the two are one copy. Save a model
    fine-tuned from it elsewhere: the graph reads those bytes.

    Args:
        model_dir: a directory written by glp, with its (fast) tokenizer.
        folder: the folder to write (created).
        labels: the class names in class-index order; None for a regressor.
        max_length: the tokens per row the model was trained on (longer rows are cut).
        pair: the model reads sentence pairs (``text`` and ``text_pair``).
        int8: onnxruntime's dynamic int8 quantisation (the graph alone).

    Raises:
        GlpError: the model has no fast tokenizer (no ``tokenizer.json`` can be written).
    """
    import json

    from glp.core.models import load_tokenizer
    from glp.deploy.text_model import META

    folder = Path(folder)
    tokenizer = load_tokenizer(model_dir)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        raise GlpError(f"{model_dir}: a text-in model needs a fast tokenizer with a padding "
                       f"token; {type(tokenizer).__name__} has none")
    folder.mkdir(parents=True, exist_ok=True)
    if not int8:
        for path in Path(model_dir).iterdir():
            if path.is_file() and path.suffix != ".onnx" and path.name not in (
                    "tokenizer.json", META):
                link_or_copy(path, folder / path.name)
    export_onnx(model_dir, folder / "model.onnx", int8=int8, fold=int8)
    if not int8 and (folder / "model.safetensors").is_file():
        share_weights(folder / "model.onnx", folder / "model.safetensors")
    backend.save(str(folder / "tokenizer.json"))
    meta = {"labels": list(labels) if labels else None, "max_length": int(max_length),
            "pad_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token),
            "pair": bool(pair), "int8": bool(int8)}
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
    return folder
