"""Zero-shot layer scores and latency: measurements of models that need no fine-tune.

Both are cached like the fine-tunes: the hidden-state similarity by the model's content,
the removed layers and the data; the latency by the checkpoints measured and the
machine (a latency measured elsewhere says nothing about this machine).
"""

from __future__ import annotations

import platform

import torch
from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from pydantic import BaseModel

from glp.core.hashing import stable_hash
from glp.core.models import load_classifier
from glp.core.provenance import code_fingerprint
from glp.core.surgery import remove_layers
from glp.deploy.bench import latency_batch, measure_latency
from glp.methods.layers.zeroshot import LayerSimilarity, hidden_state_similarity
from tasks.data import DataRef
from tasks.home import RunHome
from tasks.training import CACHED, REQUEST_CACHE, Checkpoint, load_trained, tokenized

SIMILARITY_EXAMPLES = 512  # selection-split rows whose tokens are averaged
LATENCY_BATCH = 32


class SimilarityRequest(BaseModel, frozen=True):
    """The pre-trained model with ``removed`` gone, read on one split of the task."""

    model_path: str
    model_fingerprint: str
    data: DataRef
    split: str
    removed: tuple[int, ...]
    max_length: int
    home: RunHome

    @property
    def key(self) -> str:
        return stable_hash("similarity", code_fingerprint("tasks.analysis"),
                           self.model_fingerprint,
                           self.data.fingerprints[self.split], sorted(self.removed),
                           self.max_length, SIMILARITY_EXAMPLES)


class Similarity(BaseModel, frozen=True):
    key: str
    removed: tuple[int, ...]
    cosine: tuple[tuple[float, ...], ...]
    angular: tuple[tuple[float, ...], ...]
    tokens: int

    def matrices(self) -> LayerSimilarity:
        return LayerSimilarity(cosine=self.cosine, angular=self.angular, tokens=self.tokens)


@task(name="layer-similarity", cache_policy=REQUEST_CACHE, **CACHED)
def layer_similarity(request: SimilarityRequest) -> Similarity:
    """Cosine and angular distance between every pair of hidden states (one forward pass)."""
    dataset, _ = tokenized(request.data, request.split, request.model_path,
                           request.max_length, request.home)
    model = load_classifier(request.model_path, num_labels=request.data.num_labels,
                            is_regression=request.data.is_regression, seed=0)
    remove_layers(model, request.removed)
    sim = hidden_state_similarity(model, dataset, max_examples=SIMILARITY_EXAMPLES)
    return Similarity(key=request.key, removed=request.removed, cosine=sim.cosine,
                      angular=sim.angular, tokens=sim.tokens)


class Latencies(BaseModel, frozen=True):
    """Median (and p90) forward latency per checkpoint key, measured round-robin."""

    median_ms: dict[str, float]
    p90_ms: dict[str, float]
    batch_size: int
    threads: int
    machine: str
    device: str = "cpu"


def _latency_key(context, parameters) -> str:
    keys = sorted(c.key for c in parameters["checkpoints"])
    return stable_hash("latency", keys, parameters["data"].fingerprints[parameters["split"]],
                       code_fingerprint("tasks.analysis"), parameters.get("device", "cpu"),
                       platform.node(), platform.machine(), torch.get_num_threads())


@task(name="measure-latency",
      cache_policy=TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_latency_key), **CACHED)
def measure_latencies(checkpoints: list[Checkpoint], data: DataRef, split: str,
                      max_length: int, home: RunHome, device: str = "cpu") -> Latencies:
    """Latency on ``device`` of a batch of ``split`` rows for every checkpoint, interleaved
    so that a stall of the machine hits every model alike."""
    dataset, tokenizer = tokenized(data, split, checkpoints[0].base_path, max_length, home)
    batch = latency_batch(dataset, LATENCY_BATCH, pad_id=tokenizer.pad_token_id or 0)
    models = {c.key: load_trained(c.path, data).to(device) for c in checkpoints}
    stats = measure_latency(models, batch)
    return Latencies(median_ms={k: s.median_ms for k, s in stats.items()},
                     p90_ms={k: s.p90_ms for k, s in stats.items()},
                     batch_size=LATENCY_BATCH, threads=torch.get_num_threads(),
                     machine=f"{platform.node()} {platform.machine()}", device=device)


RUNTIMES = ("torch", "onnx", "int8")
"""How a model is timed for deployment: PyTorch eager, onnxruntime fp32 and dynamic int8."""
DEPLOYED_BATCHES = (1, 32)


class Deployed(BaseModel, frozen=True):
    """Median latency (ms) per checkpoint key and ``"<runtime> b<batch>"`` (``torch b1``,
    ``int8 b32``, ...), every model and runtime interleaved at each batch size."""

    median_ms: dict[str, dict[str, float]]
    lengths: dict[str, int]  # "b1", "b32": the batch's padded length (the first dev rows)
    threads: int
    machine: str


def _deployed_key(context, parameters) -> str:
    return stable_hash("deployed", _latency_key(context, parameters), DEPLOYED_BATCHES,
                       RUNTIMES)


@task(name="measure-deployed",
      cache_policy=TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_deployed_key), **CACHED)
def measure_deployed(checkpoints: list[Checkpoint], data: DataRef, split: str,
                     max_length: int, home: RunHome, device: str = "cpu") -> Deployed:
    """CPU latency of every checkpoint as it would be deployed: in PyTorch and exported to
    ONNX (fp32 and int8, under ``artifacts/onnx/<key>/``), at batch 1 and 32 of ``split``
    rows, all models and runtimes interleaved round-robin at each batch size."""
    from glp.deploy.export import OnnxModel, export_onnx

    dataset, tokenizer = tokenized(data, split, checkpoints[0].base_path, max_length, home)
    threads = torch.get_num_threads()
    models = {}
    for checkpoint in checkpoints:
        folder = home.artifacts / "onnx" / checkpoint.key
        models[checkpoint.key, "torch"] = load_trained(checkpoint.path, data)
        for runtime, int8 in (("onnx", False), ("int8", True)):
            path = folder / f"model{'.int8' if int8 else ''}.onnx"
            if not path.is_file():
                export_onnx(checkpoint.path, path, int8=int8)
            models[checkpoint.key, runtime] = OnnxModel(path, threads=threads, spin=False)
    median: dict[str, dict[str, float]] = {c.key: {} for c in checkpoints}
    lengths = {}
    for size in DEPLOYED_BATCHES:
        batch = latency_batch(dataset, size, pad_id=tokenizer.pad_token_id or 0)
        lengths[f"b{size}"] = int(batch["input_ids"].shape[1])
        names = {f"{key}|{runtime}": model for (key, runtime), model in models.items()}
        for name, stats in measure_latency(names, batch).items():
            key, runtime = name.split("|")
            median[key][f"{runtime} b{size}"] = round(stats.median_ms, 3)
    return Deployed(median_ms=median, lengths=lengths, threads=threads,
                    machine=f"{platform.node()} {platform.machine()}")
