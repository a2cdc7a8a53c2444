"""One fine-tune of the unpruned model, evaluated on the full dev set: does a budget learn?

Used to choose each task's budget in run.sh before spending a whole comparison on it.
Runs on one CPU thread so that it can share the machine with a running comparison
(``GLP_PROBE_THREADS`` sets another number). TRAIN_LIMIT ``all`` takes the whole training set.

Usage: python docs/results/probe.py TASK TRAIN_LIMIT LR MAX_LENGTH [EPOCHS [BATCH]]
Example: python docs/results/probe.py stsb 2000 5e-5 128 1 8
The paper's protocol: python docs/results/probe.py rte all 2e-5 128 3 32
"""

import os
import sys
import time

import torch

from flows.params import DEFAULT_DATA_DIR
from glp.core.models import load_classifier, load_tokenizer, resolve_model
from glp.training.config import FineTuneConfig
from glp.training.data import get_task, limit_examples, load_glue_split, tokenize
from glp.training.train import evaluate, fine_tune


def main(task: str, limit: str, lr: str, length: str, epochs: str = "1", batch: str = "32") -> None:
    torch.set_num_threads(int(os.environ.get("GLP_PROBE_THREADS", "1")))
    spec = get_task(task)
    path = resolve_model(None)
    tokenizer = load_tokenizer(path)
    train = load_glue_split(task, DEFAULT_DATA_DIR, "train")
    if limit != "all":
        train = limit_examples(train, int(limit))
    train = tokenize(train, tokenizer, max_length=int(length))
    dev = tokenize(
        load_glue_split(task, DEFAULT_DATA_DIR, "dev"), tokenizer, max_length=int(length)
    )
    model = load_classifier(
        path, num_labels=spec.num_labels, is_regression=spec.is_regression, seed=0
    )
    config = FineTuneConfig(
        learning_rate=float(lr), epochs=float(epochs), batch_size=int(batch), max_length=int(length)
    )
    start = time.perf_counter()
    fine_tune(model, train, config, seed=40)
    metrics = evaluate(model, dev, is_regression=spec.is_regression)
    shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    seconds = time.perf_counter() - start
    print(f"{task} {limit} lr {lr} epochs {epochs} batch {batch}: {shown} ({seconds:.0f} s)")


if __name__ == "__main__":
    main(*sys.argv[1:])
