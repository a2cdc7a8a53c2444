"""Saved models timed side by side (``glp bench``): each in PyTorch and, exported on the way,
in onnxruntime fp32 and int8, at every batch size and length (:func:`glp.deploy.bench.bench`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from glp.core.errors import GlpError

RUNTIMES = ("torch", "onnx", "onnx int8")
"""The runtimes a model is timed in, in the order of the rows (``onnx``: fp32)."""


def check_bench(batch_sizes: Sequence[int], lengths: Sequence[int], repeats: int,
                threads: int | None) -> None:
    """Raises GlpError naming the first option whose value is not a whole number >= 1."""
    for option, values in (("--batch-size", batch_sizes), ("--length", lengths),
                           ("--repeats", [repeats]), ("--threads", [threads or 1])):
        bad = [v for v in values if v < 1]
        if bad:
            raise GlpError(f"{option} {bad[0]}: choose a whole number >= 1")


def time_models(models: Mapping[str, str], shapes: Sequence[tuple[int, int]], *,
                repeats: int, threads: int, onnx: bool = True) -> list[dict]:
    """Median and p90 latency of every model in every runtime at every (batch size, length).

    Args:
        models: a display name -> a model directory saved by glp (or any transformers model).
        shapes: (batch size, length) pairs; the batches are synthetic, with no padding, and
            their ids fit the smallest vocabulary among the models.
        repeats: timed rounds per shape, the models interleaved.
        threads: CPU threads of PyTorch and onnxruntime.
        onnx: also time each model exported to ONNX, fp32 and int8 (in a temporary folder).

    Returns:
        :func:`glp.deploy.bench.bench`'s rows; ``model`` is ``"NAME | RUNTIME"``.

    Raises:
        GlpError: a directory that holds no model (no config.json), or a failed export.
    """
    import torch

    from glp.core.checkpoint import load_pretrained
    from glp.deploy.bench import bench
    from glp.deploy.export import OnnxModel, export_onnx

    torch.set_num_threads(threads)
    timed, vocab = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, path) in enumerate(models.items()):
            if not (Path(path) / "config.json").is_file():
                raise GlpError(f"{name}: not a model directory (no config.json); give a "
                               "directory saved by glp or models:/NAME@alias")
            model = load_pretrained(path)
            size = model.get_input_embeddings().num_embeddings
            vocab = size if vocab is None else min(vocab, size)
            timed[f"{name} | torch"] = model
            if onnx:
                fp32 = export_onnx(path, Path(tmp) / f"{index}.onnx")
                int8 = export_onnx(path, Path(tmp) / f"{index}.int8.onnx", int8=True)
                timed[f"{name} | onnx"] = OnnxModel(fp32, threads=threads, spin=False)
                timed[f"{name} | onnx int8"] = OnnxModel(int8, threads=threads, spin=False)
        return bench(timed, list(shapes), vocab, repeats=repeats)


def versions() -> dict[str, str]:
    """The versions of the runtimes timed, for the record next to the numbers."""
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
