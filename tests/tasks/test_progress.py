"""The stop request: a fine-tune in this process stops at its next training step."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from glp.training.config import FineTuneConfig
from glp.training.train import fine_tune
from tasks import progress


@pytest.fixture(autouse=True)
def no_stop_left():
    yield
    progress.clear_stop()


def test_a_stop_request_ends_training_at_the_next_step() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=8, max_position_embeddings=8))
    data = datasets.Dataset.from_dict({"input_ids": [[2, 5, 3]] * 64,
                                       "attention_mask": [[1, 1, 1]] * 64, "labels": [1] * 64})
    on_step, close = progress.step_callback("test")
    done: list[int] = []

    def step(completed: int, total: int) -> None:
        done.append(completed)
        if completed == 2:
            progress.request_stop()
        on_step(completed, total)

    with pytest.raises(progress.Interrupted):
        fine_tune(model, data, FineTuneConfig(batch_size=8, epochs=1.0), seed=0,
                  on_step=step)
    close()
    assert done == [1, 2]  # 8 steps planned
    # Interrupted is not an Exception: Prefect crashes the task instead of retrying it.
    assert not issubclass(progress.Interrupted, Exception)


def test_clear_stop_lets_the_next_run_train() -> None:
    progress.request_stop()
    assert progress.stop_requested()
    with pytest.raises(progress.Interrupted):
        progress.check_stop()
    progress.clear_stop()
    assert not progress.stop_requested()
    progress.check_stop()
