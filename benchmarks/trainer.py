"""glp's fine-tuning loop against the Hugging Face Trainer, side by side in one process.

The same model (the embedded MiniLM with a fresh 2-class head), the same SST-2 rows, the
same settings (batch 32, max length 64, 1 epoch, lr 1e-4, linear decay, no warm-up, no
weight decay, gradient clipping at 1.0, fp32 on the CPU, seed 0), three ways:

- ``glp``: :func:`glp.training.train.fine_tune` (dynamic padding, length-grouped batches);
- ``trainer``: ``transformers.Trainer`` with its defaults (random batches, dynamic padding);
- ``trainer grouped``: the Trainer with ``train_sampling_strategy="group_by_length"``.

The three alternate, ``--rounds`` times, the order rotated each round. Reported per run:
training examples per second (wall time of the training call only) and dev accuracy, so
that a faster loop is also seen to train as well.

Needs ``accelerate`` (the Trainer's dependency): ``pip install -e '.[bench]'``.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/trainer.py [--examples 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from glp.core.models import load_tokenizer, resolve_model
from glp.training.config import FineTuneConfig
from glp.training.data import load_glue_split, tokenize
from glp.training.train import evaluate, fine_tune


def fresh_model(path: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def run_glp(path, train, dev, config: FineTuneConfig) -> dict:
    model = fresh_model(path)
    start = time.perf_counter()
    fine_tune(model, train, config, seed=0)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "accuracy": evaluate(model, dev, is_regression=False)["accuracy"]}


def run_trainer(path, train, dev, config: FineTuneConfig, tokenizer, grouped: bool) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model = fresh_model(path)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=config.batch_size,
            num_train_epochs=config.epochs, learning_rate=config.learning_rate,
            lr_scheduler_type="linear", warmup_steps=0,  # glp: warmup_ratio 0
            weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm or 0.0,
            seed=0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
            dataloader_num_workers=0,
            **({"train_sampling_strategy": "group_by_length"} if grouped else {}))
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "accuracy": evaluate(model, dev, is_regression=False)["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/trainer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(None)
    tokenizer = load_tokenizer(path)
    config = FineTuneConfig(learning_rate=1e-4, batch_size=32, max_length=64, epochs=1.0)
    data = Path("data/glue")
    train = tokenize(load_glue_split("sst2", data, "train").select(range(args.examples)),
                     tokenizer, max_length=config.max_length)
    dev = tokenize(load_glue_split("sst2", data, "dev"), tokenizer,
                   max_length=config.max_length)
    runs = {"glp": lambda: run_glp(path, train, dev, config),
            "trainer": lambda: run_trainer(path, train, dev, config, tokenizer, False),
            "trainer grouped": lambda: run_trainer(path, train, dev, config, tokenizer, True)}
    names = list(runs)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            outcome = runs[name]()
            outcome["examples_per_s"] = args.examples / outcome["seconds"]
            results[name].append(outcome)
            print(f"round {round_ + 1} {name}: {outcome['examples_per_s']:.1f} examples/s, "
                  f"dev accuracy {outcome['accuracy']:.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"examples": args.examples, "rounds": args.rounds,
                                    "threads": args.threads, "torch": torch.__version__,
                                    "results": results}, indent=1) + "\n")
    print(f"\n{args.examples} SST-2 examples, batch 32, max length 64, 1 epoch, "
          f"{args.threads} threads, {args.rounds} rounds alternating\n")
    print("| loop | examples/s (each round) | dev accuracy (each round) |")
    print("| --- | --- | --- |")
    for name in names:
        speeds = " / ".join(f"{r['examples_per_s']:.1f}" for r in results[name])
        accuracy = " / ".join(f"{r['accuracy']:.4f}" for r in results[name])
        print(f"| {name} | {speeds} | {accuracy} |")
    best = max(("trainer", "trainer grouped"),
               key=lambda n: statistics.median(r["examples_per_s"] for r in results[n]))
    lead = (statistics.median(r["examples_per_s"] for r in results["glp"])
            / statistics.median(r["examples_per_s"] for r in results[best]))
    print(f"\nglp against the faster Trainer setting ({best}): {lead:.2f}× (medians)")


if __name__ == "__main__":
    main()
